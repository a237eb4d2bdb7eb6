"""Environments for multi-turn episodes: the policy speaks, the environment answers.

An environment is a class named in ``env.name`` (a built-in name, or ``module:Class`` on the
workers' import path). The rollout worker makes one instance per episode,
``Class(**env.kwargs)``, and calls:

    first = env.reset(row)
        ``row`` is ``{"prompt": str, "answer": str | None, "index": int}``: the prompt as the
        data gave it (a string, or the text of a chat's last user message), its answer and
        its index. Returns the first observation: a string that becomes the first user
        message (rendered with the tokenizer's chat template), or ``None`` to keep the
        data's prompt as it is.

    observation, reward, done, info = env.step(action_text)
        ``action_text`` is the policy's last turn as text. ``reward`` (int or float) is the
        reward of that turn; ``done`` ends the episode; otherwise ``observation`` (str) is
        appended as a message and the policy speaks again. ``info`` is a dict; a true
        ``info["tool_call"]`` counts the turn in ``env/tool_calls``.

Optional class attributes: ``stop`` (strings that end a policy turn, kept in its text, e.g.
``["</calc>"]``) and ``role`` (the chat role of observations; default ``"user"``).

The episode's score is the sum of its turn rewards; each turn's reward sits on the turn's
last policy token (for GAE). A plain reward function is the single-turn special case and
needs no environment.
"""

from __future__ import annotations

import ast
import importlib
import operator
import re
from typing import Any, Protocol

from rlhf_ray.config_loader import ConfigError
from rlhf_ray.data.checkers import check_arithmetic


class Environment(Protocol):
    def reset(self, row: dict) -> str | None: ...

    def step(self, action_text: str) -> tuple[str, float, bool, dict]: ...


# --------------------------------------------------------------------------- calculator

_CALL = re.compile(r"<calc>(.*?)</calc>\s*$", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate_expression(text: str, max_chars: int = 64) -> str:
    """The value of an arithmetic expression (numbers, + - * / // %, parentheses) as text,
    or ``"error: ..."``; nothing else is evaluated."""
    text = text.strip()
    if len(text) > max_chars:
        return f"error: expression longer than {max_chars} characters"

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Mult) and abs(left) * abs(right) > 1e12:
                raise ValueError("result too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError("only numbers, + - * / // % and parentheses")

    try:
        result = value(ast.parse(text.replace("×", "*").replace("÷", "/"), mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, RecursionError) as e:
        return f"error: {e.msg if isinstance(e, SyntaxError) else e}"
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(round(result, 6) if isinstance(result, float) else result)


class Calculator:
    """The arithmetic task with a calculator tool.

    The policy may end a turn with ``<calc>EXPRESSION</calc>``; the result comes back as a
    tool message and the policy speaks again. A turn without a call is the final answer,
    scored 1.0 if it is right (the ``arithmetic`` checker), else 0.0. Calls earn nothing by
    themselves; ``call_cost`` (default 0) is subtracted per call.
    """

    stop = ["</calc>"]
    role = "tool"

    def __init__(self, call_cost: float = 0.0, instructions: bool = True):
        self.call_cost = float(call_cost)
        self.instructions = instructions
        self.answer: str | None = None

    @staticmethod
    def instructions_for(question: str) -> str:
        """The first message: the question and how to call the calculator."""
        return (f"{question}\nUse the calculator: write <calc>EXPRESSION</calc> and its result comes "
                "back to you. Then finish with 'The answer is N.'")

    def reset(self, row: dict) -> str | None:
        self.answer = row.get("answer")
        return self.instructions_for(row["prompt"]) if self.instructions else None

    def step(self, action_text: str) -> tuple[str, float, bool, dict]:
        call = _CALL.search(action_text)
        if call:
            return evaluate_expression(call.group(1)), -self.call_cost, False, {"tool_call": True}
        score = check_arithmetic(action_text, self.answer) if self.answer is not None else 0.0
        return "", score, True, {"tool_call": False}


# --------------------------------------------------------------------------- guessing game

_INT = re.compile(r"-?\d+")


class GuessNumber:
    """Guess the hidden number (the row's answer) over several turns, told "higher" or
    "lower" after each wrong guess. 1.0 for the right number, 0.0 otherwise."""

    def __init__(self, wrong_reward: float = 0.0):
        self.wrong_reward = float(wrong_reward)
        self.secret = 0

    def reset(self, row: dict) -> str | None:
        if row.get("answer") is None or not str(row["answer"]).lstrip("-").isdigit():
            raise ValueError(f"guess: prompt {row.get('index')} needs a whole-number answer, "
                             f"got {row.get('answer')!r}")
        self.secret = int(row["answer"])
        return None

    def step(self, action_text: str) -> tuple[str, float, bool, dict]:
        numbers = _INT.findall(action_text)
        if not numbers:
            return "Reply with one whole number.", self.wrong_reward, False, {}
        guess = int(numbers[-1])
        if guess == self.secret:
            return "", 1.0, True, {}
        return ("Higher." if guess < self.secret else "Lower."), self.wrong_reward, False, {}


BUILTIN: dict[str, type] = {"calculator": Calculator, "guess": GuessNumber}


def load_env_class(name: str) -> type:
    """The environment class ``name`` (a built-in name or ``module:Class``)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(f"env.name: {name!r} is not a built-in ({', '.join(BUILTIN)}) or 'module:Class'")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"env.name: cannot load {name!r} ({type(e).__name__}: {e})") from None
    if not (callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise ConfigError(f"env.name: {name!r} needs reset(row) and step(action_text) methods")
    return cls


def check_step_result(result: Any) -> tuple[str, float, bool, dict]:
    """``step``'s return value, checked: ``(str, int | float, bool, dict)``; raises
    TypeError saying what came back."""
    if not isinstance(result, tuple) or len(result) != 4:
        raise TypeError(f"step returned {type(result).__name__} {result!r:.80}; expected a tuple "
                        "(observation: str, reward: float, done: bool, info: dict)")
    observation, reward, done, info = result
    problems = []
    if not isinstance(observation, str):
        problems.append(f"observation is {type(observation).__name__}, expected str")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or reward != reward:
        problems.append(f"reward is {reward!r:.40}, expected a finite int or float")
    if not isinstance(done, bool):
        problems.append(f"done is {type(done).__name__}, expected bool")
    if not isinstance(info, dict):
        problems.append(f"info is {type(info).__name__}, expected dict")
    if problems:
        raise TypeError("step returned " + "; ".join(problems))
    return observation, float(reward), done, info


# --------------------------------------------------------------------------- turn format

_MARK = "\x00POLICY\x00"
_OBS = "\x00OBSERVATION\x00"


class TurnFormat:
    """The text between a policy turn and the next one: the turn's close, the observation as
    a ``role`` message, and the generation prompt, all from the tokenizer's chat template
    (so it is the same text the template would render for the whole conversation). A
    tokenizer without a template puts the observation on its own line."""

    def __init__(self, tokenizer, role: str = "user"):
        self.tokenizer = tokenizer
        self.eos_text = tokenizer.eos_token or ""
        self.close, self.open, self.role = "\n", "\n" + _OBS + "\n", role
        if getattr(tokenizer, "chat_template", None):
            for r in dict.fromkeys([role, "user"]):
                try:
                    self.close, self.open = self._from_template(r)
                    self.role = r
                    break
                except Exception:  # the template refuses the role: try "user"
                    continue

    def _from_template(self, role: str) -> tuple[str, str]:
        chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}]
        before = self.tokenizer.apply_chat_template(chat, tokenize=False)
        after = self.tokenizer.apply_chat_template([*chat, {"role": role, "content": _OBS}],
                                                   tokenize=False, add_generation_prompt=True)
        if not after.startswith(before) or _OBS not in after[len(before):]:
            raise ValueError("the chat template does not extend a conversation by appending")
        return before[before.rindex(_MARK) + len(_MARK):], after[len(before):]

    def first_prompt(self, observation: str) -> list[int]:
        """Token ids of a conversation whose first user message is ``observation``."""
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": observation}], tokenize=True, add_generation_prompt=True,
                return_dict=False))
        return self.tokenizer.encode(observation + "\n", add_special_tokens=False)

    def observation_ids(self, observation: str, ended_with_eos: bool) -> list[int]:
        """Token ids appended after a policy turn: the rest of the turn's close (its EOS is
        already there if the turn ended with it), the observation message, the next turn's
        opening."""
        close = self.close
        if ended_with_eos and self.eos_text and close.startswith(self.eos_text):
            close = close[len(self.eos_text):]
        text = close + self.open.replace(_OBS, observation)
        return self.tokenizer.encode(text, add_special_tokens=False)
