"""Environments for the multi-turn tests: scripted, and ones that fail on purpose."""

from __future__ import annotations

import threading
import time


class Scripted:
    """Answers every turn with "obs <turn>" and rewards turn t with 0.1 * t; done after
    ``turns`` policy turns."""

    def __init__(self, turns: int = 3):
        self.turns, self.t = turns, 0

    def reset(self, row):
        self.row = row
        return None

    def step(self, action_text):
        self.t += 1
        return f"obs {self.t}", 0.1 * self.t, self.t >= self.turns, {"tool_call": self.t % 2 == 1}


class FirstObservation(Scripted):
    """Replaces the prompt with its own first message."""

    def reset(self, row):
        return f"Play a game about {row['answer']}."


class RaisesOnTurn2(Scripted):
    def step(self, action_text):
        if self.t == 1:
            raise ValueError("the tool broke")
        return super().step(action_text)


class Hangs(Scripted):
    def step(self, action_text):
        time.sleep(5)
        return super().step(action_text)


class WrongTypes(Scripted):
    def step(self, action_text):
        return ["obs"], "1.0", 1, None


class ResetFails(Scripted):
    def reset(self, row):
        raise KeyError("no such level")


LOG: list = []  # what SlowForPrompt0 environments did, in order (in-process tests only)
FAST_DONE = threading.Event()  # set when the two other prompts have played all three turns


class SlowForPrompt0(Scripted):
    """Prompt 100's first step waits (up to 8 s) until the episodes of prompts 101 and 102
    have played all their turns: if the rollout loop stalled on a slow environment they
    could not, and the step returns at 8 s before them. Every step is logged."""

    def reset(self, row):
        self.index = row["index"]
        return None

    def step(self, action_text):
        if self.index == 100 and self.t == 0:
            FAST_DONE.wait(timeout=8)
            LOG.append(("slow-done", self.index))
        result = super().step(action_text)
        LOG.append(("step", self.index, self.t))
        if sum(entry[0] == "step" and entry[1] != 100 and entry[2] == 3 for entry in LOG) == 2:
            FAST_DONE.set()
        return result
