"""training/smollm2_draft.py on a tiny seeded teacher: the cut, the batches, the teacher's answers."""

from __future__ import annotations

import pytest
import torch

from training import smollm2_draft


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.defaults import build_tokenizer

    path = tmp_path_factory.mktemp("teacher")
    build_tokenizer(path, files=20)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval(), tok


def test_the_draft_is_the_teachers_layers_over_its_embeddings(teacher):
    model, _ = teacher
    draft = smollm2_draft.draft_from(model, (0, 2))
    assert draft.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 3
    assert torch.equal(draft.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(draft.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)
    assert draft.lm_head.weight is draft.model.embed_tokens.weight  # tied, as SmolLM2's


def test_batches_label_the_answer_only():
    ids, mask, labels = smollm2_draft.batch_of([{"prompt": [5, 6, 7], "answer": [8, 9]},
                                                {"prompt": [5], "answer": [10]}], pad=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 10, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, 10, -100, -100, -100]]


def test_the_teacher_agrees_with_its_own_greedy_answers(teacher):
    """answers() are the teacher's greedy tokens (batched, left-padded), so teacher-forced on them, right-padded,
    the teacher's greedy guess is the answer's token everywhere."""
    model, tok = teacher
    chats = [[{"role": "user", "content": c}] for c in ("Rewrite this code:\nx = 1", "Fix this code:\ndef f(:\n  pass",
                                                        "Rewrite this code:\nimport os")]
    rows = smollm2_draft.answers(model, tok, chats, max_new=12, batch=2)
    assert [r["prompt"] for r in rows] == [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                                   return_dict=False) for c in chats]
    assert all(r["answer"] for r in rows)
    assert smollm2_draft.agreement(model, rows, tok.pad_token_id) == 1.0


def test_training_chats_come_from_the_train_split():
    """The benchmark's prompts are held-out blocks; the draft's chats are made from train-split blocks."""
    from bench.speculative import prompts
    from training import corpus

    train = {b for t in corpus.texts("train") for b in corpus.blocks_of(t, max_lines=12)}
    chats = smollm2_draft.chats(8)
    assert all(c[0]["content"].split("\n", 1)[0] in ("Rewrite this code:", "Fix this code:") for c in chats)
    assert all(c[0]["content"].split("\n", 1)[1] in train for c in chats[::2])  # the even ones are unbroken
    assert not {c[0]["content"] for c in chats} & {p[0]["content"] for p in prompts(12)}
