"""Multi-turn episodes: environments, the rollout loop on a real vLLM engine (tiny model),
and how environment tokens are kept out of the loss, the KL and the entropy."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.advantages import gae, kl_estimate
from rlhf_ray.batch import Episode
from rlhf_ray.config import EnvConfig, SamplingConfig
from rlhf_ray.config_loader import ConfigError
from rlhf_ray.envs import (
    Calculator,
    GuessNumber,
    TurnFormat,
    check_step_result,
    evaluate_expression,
    load_env_class,
)
from rlhf_ray.experience import episodes_to_batch, turn_rewards
from rlhf_ray.losses import entropy_bonus_loss, masked_entropy, token_logprobs

# --------------------------------------------------------------------------- environments


@pytest.mark.parametrize("expr,value", [("12*7", "84"), ("(3 + 4) * 2", "14"), ("7/2", "3.5"),
                                        ("10/5", "2"), ("-3 + 1", "-2"), ("17 % 5", "2"),
                                        ("1/0", "error: division by zero"),
                                        ("2**10", "error: only numbers, + - * / // % and parentheses"),
                                        ("__import__('os')", "error: only numbers, + - * / // % and parentheses"),
                                        ("1 +", "error: invalid syntax"),
                                        ("9" * 70, "error: expression longer than 64 characters")])
def test_the_calculator_evaluates_arithmetic_and_nothing_else(expr, value):
    assert evaluate_expression(expr) == value


def test_calculator_turns_a_call_into_a_tool_message_and_scores_the_final_answer():
    env = Calculator()
    first = env.reset({"prompt": "What is 12 * 7?", "answer": "84", "index": 0})
    assert first.startswith("What is 12 * 7?") and "<calc>" in first
    assert env.step("Let me compute <calc>12*7</calc>") == ("84", 0.0, False, {"tool_call": True})
    assert env.step("The answer is 84.") == ("", 1.0, True, {"tool_call": False})
    assert env.step("The answer is 85.")[1:3] == (0.0, True)
    costly = Calculator(call_cost=0.1)
    costly.reset({"prompt": "q", "answer": "1", "index": 0})
    assert costly.step("<calc>1</calc>")[1] == -0.1
    assert Calculator(instructions=False).reset({"prompt": "q", "answer": "1", "index": 0}) is None


def test_guessing_game_says_higher_or_lower_until_right():
    env = GuessNumber()
    assert env.reset({"prompt": "p", "answer": "13", "index": 3}) is None
    assert env.step("I guess 10.") == ("Higher.", 0.0, False, {})
    assert env.step("20") == ("Lower.", 0.0, False, {})
    assert env.step("no idea")[0] == "Reply with one whole number."
    assert env.step("It is 13") == ("", 1.0, True, {})
    with pytest.raises(ValueError, match="prompt 4 needs a whole-number answer"):
        GuessNumber().reset({"prompt": "p", "answer": None, "index": 4})


def test_step_results_are_type_checked_with_what_came_back():
    assert check_step_result(("o", 1, False, {})) == ("o", 1.0, False, {})
    with pytest.raises(TypeError, match="expected a tuple"):
        check_step_result(("o", 1.0, False))
    with pytest.raises(TypeError, match="observation is list, expected str; reward is '1.0'.*done is int, "
                                        "expected bool; info is NoneType, expected dict"):
        check_step_result((["o"], "1.0", 1, None))
    with pytest.raises(TypeError, match="reward is True"):
        check_step_result(("o", True, False, {}))


def test_env_names_are_checked():
    assert load_env_class("calculator") is Calculator and load_env_class("guess") is GuessNumber
    assert load_env_class("scripted_envs:Scripted").__name__ == "Scripted"
    with pytest.raises(ConfigError, match="not a built-in"):
        load_env_class("calculater")
    with pytest.raises(ConfigError, match="cannot load 'scripted_envs:Nope'"):
        load_env_class("scripted_envs:Nope")
    with pytest.raises(ConfigError, match="needs reset"):
        load_env_class("json:dumps")
    for bad, match in [({"name": "calculater"}, "env.name"), ({"max_turns": 0}, "env.max_turns"),
                       ({"step_timeout_s": 0}, "env.step_timeout_s")]:
        with pytest.raises(ConfigError, match=match):
            EnvConfig(**bad).validate()


def test_observations_are_rendered_by_the_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    fmt = TurnFormat(tok, "tool")
    # the policy's EOS is already in its turn; a stop string (no EOS) gets the close too
    assert tok.decode(fmt.observation_ids("84", True)) == "\n<|im_start|>tool\n84<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(fmt.observation_ids("84", False)).startswith("<|im_end|>\n<|im_start|>tool\n84")
    # the appended text is what the template renders for the whole conversation
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "tool", "content": "84"}]
    whole = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    start = tok.apply_chat_template(chat[:2], tokenize=False)
    assert whole == start[: start.rindex("a") + 1] + "<|im_end|>" + tok.decode(fmt.observation_ids("84", True))


# --------------------------------------------------------------------------- loss side (pure torch)


def _episode(prompt: list[int], parts: list[tuple[str, list[int]]], rewards: list[float]) -> Episode:
    """An episode from (who, tokens) parts; 'p' = policy, 'e' = environment."""
    response, mask, ends = [], [], []
    for who, ids in parts:
        response += ids
        mask += [int(who == "p")] * len(ids)
        if who == "p":
            ends.append(len(response) - 1)
    logprobs = [-0.5 if m else 0.0 for m in mask]
    return Episode(prompt, response, "", "", logprobs, "stop", 0, score=sum(rewards),
                   response_mask=mask, turn_ends=ends, turn_rewards=rewards)


def test_environment_tokens_are_not_targets_and_turn_rewards_sit_on_turn_ends():
    a = _episode([1, 2, 3], [("p", [10, 11]), ("e", [20, 21, 22]), ("p", [12])], [0.25, 1.0])
    b = Episode([1, 2], [10, 11, 12, 13], "", "", [-0.5] * 4, "stop", 0, score=2.0)
    batch = episodes_to_batch([a, b], pad_id=0)
    # next-token aligned: position j predicts token j+1; a's response starts at token 3
    assert batch.response_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 1]
    assert batch.response_mask[1].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    placed = turn_rewards([a, b], torch.tensor([a.score, b.score]), tuple(batch.response_mask.shape))
    assert placed[0].tolist() == [0, 0, 0, 0.25, 0, 0, 0, 1.0]
    assert placed[1].tolist() == [0, 0, 0, 0, 2.0, 0, 0, 0]  # single-turn: the score at the end
    assert turn_rewards([b], torch.tensor([b.score]), (1, 5)) is None


def test_gae_steps_over_environment_tokens():
    """GAE on a row with environment tokens equals GAE on the policy tokens alone."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 1]], dtype=torch.float32)
    rewards = torch.randn(1, 9) * mask
    values = torch.randn(1, 9)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    keep = mask[0].bool()
    compact_adv, compact_ret = gae(rewards[:, keep], values[:, keep], torch.ones(1, int(keep.sum())), 0.9, 0.8)
    assert torch.allclose(adv[:, keep], compact_adv) and torch.allclose(ret[:, keep], compact_ret)
    assert (adv[:, ~keep] == 0).all()


def test_kl_and_entropy_ignore_environment_tokens():
    a = _episode([1, 2], [("p", [10]), ("e", [20, 21]), ("p", [12])], [1.0])
    batch = episodes_to_batch([a], pad_id=0)
    mask = batch.response_mask
    logprobs, ref = torch.randn(mask.shape), torch.randn(mask.shape)
    ref_env_changed = ref.clone()
    ref_env_changed[mask == 0] += 5.0
    assert torch.equal(kl_estimate(logprobs, ref, "k3") * mask, kl_estimate(logprobs, ref_env_changed, "k3") * mask)
    logits = torch.randn(1, mask.shape[1], 7)
    env_changed = logits.clone()
    env_changed[mask == 0] = torch.randn_like(env_changed[mask == 0]) * 10
    assert torch.allclose(entropy_bonus_loss(logits, mask), entropy_bonus_loss(env_changed, mask))
    assert torch.allclose(masked_entropy(logits, mask), masked_entropy(env_changed, mask))


# --------------------------------------------------------------------------- the rollout loop (vLLM)


@pytest.fixture(scope="module")
def worker(tiny_llama):
    from rlhf_ray.config import RolloutConfig
    from rlhf_ray.workers.rollout import RolloutWorker

    w = RolloutWorker(tiny_llama, RolloutConfig(max_model_len=160), seed=0)
    yield w
    w.shutdown()


def play(worker, env: str, prompts=None, n: int = 2, max_new_tokens: int = 6, max_model_len: int | None = None,
         **env_options):
    """Run ``env`` (a class of tests/helpers/scripted_envs.py or a built-in) on the worker."""
    from rlhf_ray.workers.multiturn import MultiTurnRollout

    name = env if env in ("calculator", "guess") else f"scripted_envs:{env}"
    fields = set(EnvConfig.__dataclass_fields__)
    cfg = EnvConfig(name=name, kwargs={k: v for k, v in env_options.items() if k not in fields},
                    **{k: v for k, v in env_options.items() if k in fields})
    rollout = MultiTurnRollout(worker.llm, worker.tokenizer, load_env_class(name), cfg,
                               max_model_len or worker.max_model_len, "rollout")
    try:
        prompts = prompts or [[1, 2, 3, 4], [5, 6, 7]]
        rows = [{"prompt": f"question {i}", "answer": str(10 + i), "index": 100 + i} for i in range(len(prompts))]
        return rollout.run(prompts, rows, SamplingConfig(n=n, max_new_tokens=max_new_tokens, seed=3), version=7)
    finally:
        rollout.close()


def _segments(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of the mask."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


def test_token_accounting_of_a_scripted_episode(worker):
    episodes = play(worker, "Scripted", turns=3)
    assert [(e.prompt_index, e.sample_index) for e in episodes] == [(100, 0), (100, 1), (101, 0), (101, 1)]
    fmt = TurnFormat(worker.tokenizer, "user")
    for e in episodes:
        assert e.prompt_ids in ([1, 2, 3, 4], [5, 6, 7]) and e.policy_version == 7
        assert len(e.response_ids) == len(e.response_mask) == len(e.logprobs)
        runs = _segments(e.response_mask)
        assert [v for v, _, _ in runs] == [1, 0, 1, 0, 1]  # policy, env, policy, env, policy
        assert e.turn_ends == [end - 1 for v, _, end in runs if v == 1]
        for t, (_, start, end) in enumerate(r for r in runs if r[0] == 0):
            turn_ids = e.response_ids[:start]
            # the observation is exactly the template's text for "obs <t>" after this turn
            eos = turn_ids[-1] == worker.tokenizer.eos_token_id
            assert e.response_ids[start:end] == fmt.observation_ids(f"obs {t + 1}", eos)
            assert all(lp == 0.0 for lp in e.logprobs[start:end])
        assert all(lp <= 0 for lp in e.logprobs)
        assert e.turn_rewards == pytest.approx([0.1, 0.2, 0.3]) and e.score == pytest.approx(0.6)
        assert e.tool_calls == 2 and e.turns == 3 and e.env_error is None
        assert e.policy_tokens == sum(end - start for v, start, end in runs if v == 1)


def test_vllm_and_learner_logprobs_agree_on_policy_tokens(worker, tiny_llama):
    from transformers import AutoModelForCausalLM

    episodes = play(worker, "Scripted", turns=3, max_new_tokens=8)
    batch = episodes_to_batch(episodes, pad_id=worker.tokenizer.pad_token_id or 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    learner = token_logprobs(logits, batch.input_ids)
    mask = batch.response_mask.bool()
    sampled = batch.rollout_logprobs
    assert int(mask.sum()) == sum(e.policy_tokens for e in episodes)
    assert (learner[mask] - sampled[mask]).abs().max() < 2e-3
    assert (sampled[~mask] == 0).all()


def test_a_slow_environment_does_not_stall_the_others(worker):
    """Prompt 0's environment blocks on its first step until the other episodes have played
    all their turns (at most 8 s); they can only do so while it blocks if the loop does
    not wait for it."""
    import scripted_envs

    scripted_envs.LOG.clear()
    scripted_envs.FAST_DONE.clear()
    play(worker, "SlowForPrompt0", turns=3, n=1, prompts=[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
         step_timeout_s=20)
    log = list(scripted_envs.LOG)
    slow_returned = log.index(("slow-done", 100))
    fast_last_steps = [i for i, entry in enumerate(log) if entry == ("step", 101, 3) or entry == ("step", 102, 3)]
    assert len(fast_last_steps) == 2 and max(fast_last_steps) < slow_returned, log


def test_a_first_observation_replaces_the_prompt(worker):
    episodes = play(worker, "FirstObservation", turns=1, n=1)
    expected = TurnFormat(worker.tokenizer).first_prompt("Play a game about 10.")
    assert episodes[0].prompt_ids == expected
    assert "Play a game about 10." in episodes[0].prompt_text


def test_episodes_end_at_max_turns_and_at_max_model_len(worker):
    episodes = play(worker, "Scripted", turns=10, max_turns=2, n=1)
    assert all(e.turns == 2 and e.finish_reason == "length" and len(e.turn_rewards) == 2 for e in episodes)
    short = play(worker, "Scripted", turns=10, max_turns=10, n=1, max_new_tokens=12, max_model_len=64)
    for e in short:
        assert len(e.prompt_ids) + len(e.response_ids) <= 64
        assert e.finish_reason == "length" and e.response_mask[-1] == 1 and e.turns < 10


@pytest.mark.parametrize("env,options,reason", [
    ("RaisesOnTurn2", {}, "step failed on prompt 100 (sample 0), turn 2: ValueError: the tool broke"),
    ("Hangs", {"step_timeout_s": 0.5}, "step failed on prompt 100 (sample 0), turn 1: took longer than "
                                       "env.step_timeout_s=0.5 s"),
    ("WrongTypes", {}, "step failed on prompt 100 (sample 0), turn 1: TypeError: step returned observation "
                       "is list, expected str"),
    ("ResetFails", {}, "reset failed on prompt 100 (sample 0), turn 1: KeyError: 'no such level'"),
])
def test_a_failing_environment_is_an_error_that_names_it_or_a_counted_episode(worker, env, options, reason):
    from rlhf_ray.workers.multiturn import EnvError

    with pytest.raises(EnvError) as raised:
        play(worker, env, n=1, prompts=[[1, 2, 3]], **options)
    assert f"environment 'scripted_envs:{env}': {reason}" in str(raised.value)
    # the engine was left clean: the next call works
    assert len(play(worker, "Scripted", n=1, prompts=[[1, 2, 3]], turns=1)) == 1
    counted = play(worker, env, n=2, prompts=[[1, 2, 3]], on_error="count", failure_reward=-1.0, **options)
    for e in counted:
        assert e.env_error is not None and reason.replace("sample 0", f"sample {e.sample_index}") in e.env_error
        assert e.score == -1.0 and sum(e.turn_rewards) == -1.0
        assert e.policy_tokens > 0 and e.response_mask[-1] == 1


def test_the_builtin_environments_run_on_the_engine(worker):
    for env in ("calculator", "guess"):
        episodes = play(worker, env, n=2, max_turns=3)
        assert len(episodes) == 4
        assert all(e.env_error is None and 1 <= e.turns <= 3 and e.score in (0.0, 1.0) for e in episodes)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++", "reinforce++-baseline"])
def test_critic_free_advantages_use_the_episode_score_on_policy_tokens_only(estimator):
    """Two prompts x two samples of multi-turn episodes: every estimator puts advantages on
    the policy tokens only, and with no KL a sample's policy tokens share one advantage
    (the episode-level reward), whatever the environment tokens between its turns."""
    from rlhf_ray.experience import critic_free_advantages

    episodes = [_episode([1, 2], [("p", [10, 11]), ("e", [20, 21]), ("p", [12])], [0.0, r])
                for r in (1.0, 0.0, 0.5, 0.25)]
    batch = episodes_to_batch(episodes, pad_id=0)
    scores = torch.tensor([e.score for e in episodes])
    adv, _ = critic_free_advantages(batch, scores, estimator, group_size=2)
    mask = batch.response_mask.bool()
    assert (adv[~mask] == 0).all()
    for row in range(4):
        values = adv[row][mask[row]]
        assert torch.allclose(values, values[0].expand_as(values))
    assert adv[0][mask[0]][0] > adv[1][mask[1]][0]  # the higher-scoring sample of the group
