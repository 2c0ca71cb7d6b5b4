"""
Health monitors for the adversarial game: each catches one way GAD is known to break, early, and
says so in one line (train_gad.py prints it and records it in metrics.jsonl under "warnings").

    from health import Monitors
    mon = Monitors(window=5, chance_band=0.05, saturation=0.98, length_drift=0.5, zero_adv=0.5,
                   teacher_loops=0.05, loop_margin=0.15)
    for rec in records:           # metrics.jsonl records, one per step
        for w in mon.check(rec):  # the warnings that start at this step
            print(w)

- D near chance: its pairwise accuracy averages within chance_band of 0.5 over `window` steps:
  D is not learning, so the reward is noise.
- D fooled: in the GAD stage, D's accuracy on the fresh samples averages below 0.5 - chance_band over
  `window` steps (trained or frozen D alike): D scores the student above the teacher, so G is
  exploiting it, the reward hacking of a frozen or lagging D.
- D saturated: accuracy averages >= saturation: the generator gets almost no signal, or D found a
  shortcut (classically, teacher and student answers that end differently).
- Length drift: the mean response length moved by more than length_drift (a fraction) from its
  value at the start of the GAD stage: the reward hacking the paper saw with a frozen D.
- Zero advantages: on average at least zero_adv of the prompt groups got n equal rewards, so
  their samples teach G nothing.
- Loops: the fraction of the step's samples that loop (has_loop) rose above the teacher answers' own
  rate by more than loop_margin: the degeneration of a policy that found a phrase D rewards.
A warning fires when its condition starts and again only after it has cleared.
"""

import re

LOOP_REPEATS = 4  # a unit of 1-3 words said this many times in a row is a loop


def has_loop(text):
    """Whether a 1-3-word unit repeats LOOP_REPEATS or more times in a row ("Aye, aye, aye, aye", "me
    aye, me aye, me aye, me aye"); words are lowercase letter and digit runs, punctuation ignored."""
    w = re.findall(r"\w+", text.lower())
    n = LOOP_REPEATS
    return any(w[i:i + k] * n == w[i:i + k * n] for k in (1, 2, 3) for i in range(len(w) - k * n + 1))


class Monitors:
    def __init__(self, window, chance_band, saturation, length_drift, zero_adv, teacher_loops=0.0, loop_margin=None):
        self.window, self.chance_band, self.saturation = window, chance_band, saturation
        self.length_drift, self.zero_adv = length_drift, zero_adv
        self.teacher_loops, self.loop_margin = teacher_loops, loop_margin
        self.d_acc, self.gad_acc, self.zero, self.loops, self.gad_len0, self.active = [], [], [], [], None, set()

    def check(self, rec):
        """The warnings that start with this step's record."""
        if "d_grad_norm" in rec:  # a step where D trained: its accuracy says how D learns
            self.d_acc = (self.d_acc + [rec["d_acc"]])[-self.window:]
        if rec.get("stage") == "gad" and "d_acc" in rec:
            self.gad_acc = (self.gad_acc + [rec["d_acc"]])[-self.window:]
        if "zero_adv_frac" in rec:
            self.zero = (self.zero + [rec["zero_adv_frac"]])[-self.window:]
        if "loop_frac" in rec:
            self.loops = (self.loops + [rec["loop_frac"]])[-self.window:]
        full = len(self.d_acc) == self.window
        acc = sum(self.d_acc) / max(1, len(self.d_acc))
        conditions = {
            "d_chance": (full and abs(acc - 0.5) <= self.chance_band,
                         f"D's accuracy stayed near chance ({acc:.2f} on average over {self.window} steps): D is "
                         "not learning and the reward is noise (its lr, --d-head-lr, or too few prompts per step)"),
            "d_saturated": (full and acc >= self.saturation,
                            f"D's accuracy is saturated ({acc:.2f} on average over {self.window} steps): G gets "
                            "little signal, or D found a shortcut (do teacher and student answers end alike?)"),
        }
        if len(self.gad_acc) == self.window:
            g = sum(self.gad_acc) / self.window
            conditions["d_fooled"] = (g < 0.5 - self.chance_band,
                                      f"D scores the student's samples above the teacher's ({g:.2f} accuracy on "
                                      f"average over {self.window} GAD steps): G is exploiting D, the reward "
                                      "hacking of a frozen or lagging D (a faster D: --d-lr, --d-head-lr)")
        if rec.get("stage") == "gad" and "resp_len_mean" in rec:
            self.gad_len0 = self.gad_len0 or rec["resp_len_mean"]
            drift = rec["resp_len_mean"] / self.gad_len0 - 1 if self.gad_len0 else 0.0
            conditions["length"] = (abs(drift) > self.length_drift,
                                    f"the mean response length moved {drift:+.0%} since the GAD stage began "
                                    f"({self.gad_len0:.1f} -> {rec['resp_len_mean']:.1f} tokens): the reward "
                                    "hacking of a D that stopped learning?")
        if len(self.zero) == self.window:
            z = sum(self.zero) / self.window
            conditions["zero_adv"] = (z >= self.zero_adv,
                                      f"{z:.0%} of prompt groups got n equal rewards over {self.window} steps: "
                                      "their samples teach G nothing (identical samples? raise --temperature)")
        if self.loop_margin is not None and len(self.loops) == self.window:
            lp = sum(self.loops) / self.window
            conditions["loops"] = (lp > self.teacher_loops + self.loop_margin,
                                   f"{lp:.0%} of the samples loop (a 1-3-word unit 4 times in a row) over {self.window} "
                                   f"steps, against {self.teacher_loops:.0%} of the teacher's answers: G degenerates "
                                   "toward a phrase D rewards (a smaller --lr, a larger --kl-coef, a faster D)")
        out = []
        for key, (bad, msg) in conditions.items():
            if bad and key not in self.active:
                out.append(f"warning: step {rec['step']}: {msg}")
            self.active = self.active | {key} if bad else self.active - {key}
        return out
