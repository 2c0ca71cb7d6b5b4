"""A toy world for training tests: a word-level tokenizer with a chat template, a tiny random
Llama student, and a teacher whose answers say "yes" far more often than the student does."""
import json
import random

import torch

WORDS = ["yes", "no", "red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "rain", "snow"]
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = TEMPLATE
    return tok


def make_student(path, seed=0, hidden=32, layers=2):
    """Save a tiny random Llama + the toy tokenizer as an HF checkpoint directory."""
    import transformers
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def yes_rate(texts):
    words = [w for t in texts for w in t.split()]
    return sum(w == "yes" for w in words) / max(1, len(words))


def make_data(path, n, seed=0, words=(10, 12)):
    """Prompts of random words; the teacher answers with `words` words, most of them "yes"; longer
    than the tests' --max-new-tokens, so teacher and student answers alike are cut and D must judge content."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS[2:]) for _ in range(rng.randint(2, 5)))
            a = " ".join("yes" if rng.random() < 0.7 else rng.choice(WORDS[1:]) for _ in range(rng.randint(*words)))
            f.write(json.dumps({"id": f"toy-{i:04d}", "messages": [{"role": "user", "content": q}], "teacher": a}) + "\n")
    return str(path)
