"""Multi-turn rollout: many episodes on one vLLM engine, each a conversation with its own
environment (see :mod:`rlhf_ray.envs`).

An episode is kept as token ids from end to end, never re-tokenised:

    prompt_ids | turn 1 (policy) | observation 1 (env) | turn 2 (policy) | ... | turn k (policy)

``response_mask`` (A,) is 1 on the tokens the policy sampled and 0 on the environment's;
``logprobs`` (A,) holds the sampled tokens' log-probs and 0.0 on environment tokens;
``turn_ends`` are the positions (in the response) of each turn's last policy token, and
``turn_rewards`` the reward the environment gave for that turn.

The engine is stepped here, one decode iteration at a time, while environment calls run on a
thread pool: a finished turn's ``env.step`` runs while the other episodes keep generating,
and its episode's next turn joins the engine's batch as soon as the call returns. A call
that raises, returns the wrong types or outlives ``env.step_timeout_s`` fails its episode
(``env.on_error``): ``raise`` stops the call with :class:`EnvError` naming the environment,
the prompt and the turn; ``count`` ends that episode with ``env.failure_reward`` and records
the error on it. The episode always ends on a policy turn: an observation is only appended
when the policy speaks again.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from rlhf_ray.batch import Episode
from rlhf_ray.config import EnvConfig, SamplingConfig
from rlhf_ray.envs import TurnFormat, check_step_result


class EnvError(RuntimeError):
    """An environment failed (raised, hung or returned the wrong types) with on_error=raise."""


@dataclass
class Trajectory:
    """One episode in progress."""

    prompt_index: int
    sample_index: int
    answer: Any
    row: dict
    env: Any
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    tool_calls: int = 0
    finish_reason: str = "length"
    error: str | None = None
    last_turn_eos: bool = False
    final_turn: bool = False  # the next turn ends the episode without calling the environment
    done: bool = False


class MultiTurnRollout:
    """Runs episodes against an environment class on a ``vllm.LLM``."""

    def __init__(self, llm, tokenizer, env_cls: type, env_cfg: EnvConfig, max_model_len: int,
                 worker: str):
        self.llm, self.tokenizer = llm, tokenizer
        self.env_cls, self.cfg = env_cls, env_cfg
        self.max_model_len = max_model_len
        self.worker = worker
        self.format = TurnFormat(tokenizer, getattr(env_cls, "role", "user"))
        self.stop = list(getattr(env_cls, "stop", []) or [])
        self.pool = ThreadPoolExecutor(env_cfg.threads, thread_name_prefix="env")
        self._ids = 0

    # ------------------------------------------------------------------ public

    def run(self, prompts: list[list[int]], rows: list[dict], sampling: SamplingConfig,
            version: int) -> list[Episode]:
        """``sampling.n`` episodes per prompt, grouped by prompt like single-turn generate."""
        self._sampling = sampling
        self._requests: dict[str, tuple[Trajectory, str]] = {}  # external id -> (episode, engine id)
        self._calls: dict[Future, tuple[Trajectory, str, float]] = {}
        trajectories = []
        for ids, row in zip(prompts, rows):
            for k in range(sampling.n):
                t = Trajectory(row["index"], k, row.get("answer"), row, None, list(ids))
                trajectories.append(t)
                self._call(t, "reset", self._reset, t)
        try:
            self._loop(trajectories)
        except BaseException:
            if self._requests:  # leave the engine empty for the next call
                self.llm.llm_engine.abort_request([i for _, i in self._requests.values()], internal=True)
            raise
        return [self._episode(t, version) for t in trajectories]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the loop

    def _loop(self, trajectories: list[Trajectory]) -> None:
        engine = self.llm.llm_engine
        while not all(t.done for t in trajectories):
            for future in [f for f in self._calls if f.done()]:
                t, kind, _ = self._calls.pop(future)
                self._returned(t, kind, future)
            now = time.monotonic()
            for future, (t, kind, deadline) in list(self._calls.items()):
                if now > deadline:
                    del self._calls[future]
                    future.cancel()
                    self._fail(t, kind, f"took longer than env.step_timeout_s={self.cfg.step_timeout_s} s")
            if engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        self._turn_done(self._requests.pop(out.request_id)[0], out.outputs[0])
            elif self._calls:
                soonest = min(deadline for _, _, deadline in self._calls.values())
                wait(list(self._calls), timeout=max(0.0, soonest - time.monotonic()) + 0.01,
                     return_when=FIRST_COMPLETED)
            elif not all(t.done for t in trajectories):
                stuck = [t.prompt_index for t in trajectories if not t.done]
                raise RuntimeError(f"{self.worker}: multi-turn rollout stalled with prompts {stuck} "
                                   "neither generating nor waiting for the environment")

    def _call(self, t: Trajectory, kind: str, fn, *args) -> None:
        self._calls[self.pool.submit(fn, *args)] = (t, kind, time.monotonic() + self.cfg.step_timeout_s)

    def _reset(self, t: Trajectory):
        t.env = self.env_cls(**self.cfg.kwargs)
        return t.env.reset(dict(t.row))

    def _returned(self, t: Trajectory, kind: str, future: Future) -> None:
        if t.done:
            return
        try:
            result = future.result()
            if kind == "reset":
                self._start_episode(t, result)
            else:
                self._stepped(t, check_step_result(result))
        except EnvError:
            raise
        except Exception as e:  # the environment's own error, or a type check
            self._fail(t, kind, f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------ turns

    def _start_episode(self, t: Trajectory, first) -> None:
        if first is not None:
            if not isinstance(first, str):
                raise TypeError(f"reset returned {type(first).__name__}; expected str or None")
            t.prompt_ids = self.format.first_prompt(first)
        if len(t.prompt_ids) >= self.max_model_len:
            raise EnvError(f"{self.worker}: prompt {t.prompt_index} has {len(t.prompt_ids)} tokens after "
                           f"env.reset; rollout.max_model_len is {self.max_model_len}")
        self._generate(t)

    def _generate(self, t: Trajectory) -> None:
        from vllm import SamplingParams, TokensPrompt

        s = self._sampling
        ids = t.prompt_ids + t.response_ids
        turn = len(t.turn_ends)
        seed = None if s.seed is None else s.seed + t.prompt_index * 1009 + t.sample_index + turn * 100_003
        params = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_tokens=min(s.max_new_tokens, self.max_model_len - len(ids)),
                                logprobs=0, seed=seed, stop=self.stop or None,
                                include_stop_str_in_output=True)
        engine_id = self.llm.enqueue([TokensPrompt(prompt_token_ids=ids)], [params], use_tqdm=False)[0]
        # the engine adds "-<8 random characters>" to the id its outputs carry
        self._requests[engine_id.rsplit("-", 1)[0]] = (t, engine_id)

    def _turn_done(self, t: Trajectory, out) -> None:
        tokens = list(out.token_ids)
        t.response_ids += tokens
        t.response_mask += [1] * len(tokens)
        t.logprobs += [step[tok].logprob for step, tok in zip(out.logprobs, tokens)]
        t.turn_ends.append(len(t.response_ids) - 1)
        t.last_turn_eos = out.finish_reason == "stop" and out.stop_reason is None
        t.finish_reason = "stop" if out.finish_reason == "stop" else "length"
        if t.final_turn or not tokens:
            t.turn_rewards.append(0.0)
            t.done = True
            return
        self._call(t, "step", t.env.step, out.text)

    def _stepped(self, t: Trajectory, result: tuple[str, float, bool, dict]) -> None:
        observation, reward, done, info = result
        t.turn_rewards.append(reward)
        t.tool_calls += bool(info.get("tool_call"))
        if done:
            t.done = True
            return
        if len(t.turn_ends) >= self.cfg.max_turns:
            t.finish_reason = "length"  # out of turns
            t.done = True
            return
        obs_ids = self.format.observation_ids(observation, t.last_turn_eos)
        if len(t.prompt_ids) + len(t.response_ids) + len(obs_ids) >= self.max_model_len:
            t.finish_reason = "length"  # no room for another turn
            t.done = True
            return
        t.response_ids += obs_ids
        t.response_mask += [0] * len(obs_ids)
        t.logprobs += [0.0] * len(obs_ids)
        self._generate(t)

    def _fail(self, t: Trajectory, kind: str, reason: str) -> None:
        name = self.cfg.name
        message = (f"environment {name!r}: {kind} failed on prompt {t.prompt_index} (sample "
                   f"{t.sample_index}), turn {len(t.turn_ends) + (kind == 'reset')}: {reason}")
        if self.cfg.on_error == "raise":
            raise EnvError(message)
        t.error = message
        if not t.turn_ends:  # reset failed: the policy answers the data's prompt once, unscored
            t.final_turn = True
            return self._generate(t)
        t.done = True

    # ------------------------------------------------------------------ output

    def _episode(self, t: Trajectory, version: int) -> Episode:
        rewards = t.turn_rewards
        if t.error is not None:  # the failure reward replaces what the turns earned
            rewards = [0.0] * (len(t.turn_ends) - 1) + [self.cfg.failure_reward]
        return Episode(
            prompt_ids=t.prompt_ids, response_ids=t.response_ids,
            prompt_text=self.tokenizer.decode(t.prompt_ids),
            response_text=self.tokenizer.decode(t.response_ids),
            logprobs=t.logprobs, finish_reason=t.finish_reason, policy_version=version,
            prompt_index=t.prompt_index, sample_index=t.sample_index, answer=t.answer,
            score=float(sum(rewards)), worker=self.worker, response_mask=t.response_mask,
            turn_ends=t.turn_ends, turn_rewards=rewards, tool_calls=t.tool_calls, env_error=t.error)
