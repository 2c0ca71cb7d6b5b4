"""
The discriminator D of GAD: the student's backbone with a scalar head. D(x, y) is the head's output
at the last valid token of prompt + response; it is trained with the Bradley-Terry loss to score the
teacher's answer above the student's, and its raw score is the student's reward.

    from discriminator import Discriminator, pair_loss, save_discriminator
    from loading import load_model
    D = load_model("Qwen/Qwen2.5-7B-Instruct", Discriminator)      # student weights + a fresh head
    scores = D(input_ids, lengths)                                  # one score per row
    loss = pair_loss("bt", scores_teacher, scores_student).mean()   # Bradley-Terry
    save_discriminator(D, "out/disc", tok, pad_token_id=pad)        # an HF *ForSequenceClassification

The saved directory loads in transformers as Qwen2ForSequenceClassification /
LlamaForSequenceClassification / Qwen3ForSequenceClassification with num_labels=1 and gives the
same scores (see tests/test_train.py::test_discriminator_hf_checkpoint).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from loading import config_to_hf, save_model
from model import Transformer


class Discriminator(Transformer):
    # Parameter names are HF's sequence-classification layout: model.* plus score.weight.
    # The paper's head is Linear(hidden, 1) with a bias initialised to 0. The Bradley-Terry loss only
    # sees score differences, so that bias gets exactly zero gradient and stays 0 forever; we drop it,
    # which is also what HF's *ForSequenceClassification has.
    init_if_missing = ("score.weight",)

    def __init__(self, cfg):
        super().__init__(cfg, lm_head=False)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def init_missing(self, names, device, dtype):
        if "score.weight" in names:  # a fresh head: normal(0, 0.02), as in the paper
            w = torch.empty(1, self.config.hidden_size, device=device, dtype=torch.float32).normal_(0, 0.02)
            self.score.weight = nn.Parameter(w.to(dtype))

    def add_head_bias(self):
        """A bias on the score head, zero at first: the BCE ablation sees absolute scores and needs
        it (BT's gradient for it is exactly 0). HF's layout has no such bias: save_discriminator drops it."""
        w = self.score.weight
        self.score.bias = nn.Parameter(torch.zeros(1, device=w.device, dtype=w.dtype))
        return self

    def forward(self, idx, lengths):
        """idx [B, T] right-padded, lengths [B] -> scores [B] (fp32) at each row's last valid token.
        Indexing by length, never by a pad id: pad is often the same id as the end-of-turn token."""
        h = super().forward(idx, hidden=True)
        last = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.score(last).float().squeeze(-1).clone()  # not a view: FSDP2 hooks module outputs


def save_discriminator(D, out_dir, tokenizer=None, state_dict=None, pad_token_id=None):
    """HF sequence-classification checkpoint. HF picks the last token that is not pad_token_id, so
    pad_token_id must be an id that never ends a sequence: pass one that is not a stop token."""
    sd = state_dict if state_dict is not None else D.state_dict()
    if "score.bias" in sd:
        # a constant shift of every score: per-group advantages and BT pairs cancel it
        print(f"{out_dir}: the score head's bias ({float(sd['score.bias'].reshape(-1)[0]):.4g}) is left out of "
              "the HF export (HF's *ForSequenceClassification has none); resume/ keeps it")
        sd = {k: v for k, v in sd.items() if k != "score.bias"}
    cfg = config_to_hf(D.config, next(iter(sd.values())).dtype)
    cfg["architectures"] = [cfg["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad_token_id,
               problem_type="regression")
    save_model(D, out_dir, tokenizer, state_dict=sd, hf_config=cfg)


def pad_id_for_scoring(tok, stop_ids):
    """An id that is not a stop token, for HF's pad-based last-token lookup (see save_discriminator)."""
    for cand in (tok.pad_token_id, tok.convert_tokens_to_ids("<|endoftext|>"), tok.unk_token_id, 0):
        if cand is not None and cand >= 0 and cand not in stop_ids:
            return int(cand)
    return 0


def pair_loss(kind, r_teacher, r_student):
    """The discriminator's loss for each (teacher answer, student sample) pair, by broadcasting.
    bt (the paper's): Bradley-Terry, -log sigmoid(D(x, y_teacher) - D(x, y_student)).
    bce (the paper's ablation): teacher labelled 1, student 0, each pair weighing its two halves
    equally; it sees absolute scores, so it needs the head's bias (Discriminator.add_head_bias).
    The training loop and the logged d_loss both call this: swap the loss here, in one place."""
    if kind == "bt":
        return -F.logsigmoid(r_teacher - r_student)
    if kind == "bce":
        return -(F.logsigmoid(r_teacher) + F.logsigmoid(-r_student)) / 2
    raise ValueError(f"unknown discriminator loss {kind!r} (bt or bce)")


def d_accuracy(r_teacher, r_student):
    """Fraction of pairs where D scores the teacher's answer above the student's."""
    return (r_teacher > r_student).float().mean()
