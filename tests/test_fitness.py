"""fitness.py: chunked NLL equals transformers' own loss, PPL aggregation, NaN handling, Evaluator cache."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from longrope_search.errors import ConfigError, ModelError
from longrope_search.fitness import FITNESS, Evaluator, FitnessResult, check_head, perplexity, sequence_nll

VOCAB = 1000
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
# architectures whose forward transforms the logits after lm_head, with the transform switched on
HEADS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}, "sdpa"),
    "gemma2-softcap": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 16, "final_logit_softcapping": 3.0}, "eager"),
    "granite-scaling": (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 4.0}, "sdpa"),
    "cohere-scale": (CohereConfig, CohereForCausalLM, {"logit_scale": 0.5}, "sdpa"),
}


def tiny(kind: str = "llama", seed: int = 0):
    config_cls, model_cls, extra, attn = HEADS[kind]
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = attn  # Gemma 2 soft-caps attention, which SDPA cannot do
    torch.manual_seed(seed)
    return model_cls(config).eval().requires_grad_(False)


def random_ids(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))  # (n, L)


def reference_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(ids.reshape(1, -1), labels=ids.reshape(1, -1)).loss.item()


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 99, 100, 4096])
def test_chunked_nll_equals_transformers_loss(chunk_size):
    model = tiny()
    ids = random_ids(1, 100)  # 99 predicted tokens: 7 and 32 do not divide it
    ours = sequence_nll(model, ids, chunk_size)
    assert math.exp(ours) == pytest.approx(math.exp(reference_loss(model, ids)), rel=1e-5)


def test_head_with_bias_reuses_buffers_and_stays_exact():
    model = tiny()
    model.lm_head = torch.nn.Linear(64, VOCAB, bias=True)  # GPT-J style head with a bias
    model.lm_head.requires_grad_(False)
    ids = random_ids(1, 90)
    assert sequence_nll(model, ids, 32) == pytest.approx(reference_loss(model, ids), rel=1e-5)


@pytest.mark.parametrize("kind", ["gemma2-softcap", "granite-scaling", "cohere-scale"])
def test_chunked_nll_applies_each_architecture_logit_transform(kind):
    model = tiny(kind)
    ids = random_ids(1, 80)
    assert sequence_nll(model, ids[0], 13) == pytest.approx(reference_loss(model, ids), rel=1e-5)
    check_head(model, ids)


def test_perplexity_is_exp_of_the_mean_per_sample_nll():
    model = tiny()
    samples = random_ids(3, 60)
    result = perplexity(model, samples, chunk_size=16)
    expected = [reference_loss(model, row) for row in samples]
    assert result.nlls == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(expected) / 3), rel=1e-5)
    assert result.tokens == 3 * 59 and result.error is None
    assert FITNESS["ppl"] is perplexity


def test_non_finite_loss_gives_infinite_ppl_and_an_error_not_a_raise():
    model = tiny()
    model.lm_head.weight[0, 0] = float("nan")
    result = perplexity(model, random_ids(2, 20))
    assert result.ppl == math.inf and "nan" in result.error and "sample 0" in result.error
    assert len(result.nlls) == 1  # later samples are skipped


def test_evaluator_scores_each_key_once_and_candidates_differ():
    evaluator = Evaluator(tiny(), random_ids(2, 48), chunk_size=16)
    ones, pi = [1.0] * 8, [4.0] * 8  # rotary_dim 16 -> 8 factors
    first = evaluator.score("ones", ones)
    assert evaluator.score("ones", ones) is first and evaluator.evaluations == 1
    second = evaluator.score("pi", pi)
    assert evaluator.evaluations == 2 and second.ppl != pytest.approx(first.ppl, rel=1e-4)
    # scoring the first key again must not silently reuse the tables of the last installed candidate
    evaluator.results.clear()
    assert evaluator.score("ones", ones).ppl == pytest.approx(first.ppl, rel=1e-6)


def test_plain_factors_score_like_the_untouched_model():
    model, samples = tiny(), random_ids(2, 48)
    baseline = perplexity(model, samples).ppl
    assert Evaluator(model, samples).score("ones", [1.0] * 8).ppl == pytest.approx(baseline, rel=1e-5)


def test_preloaded_scores_are_reused_without_evaluation():
    evaluator = Evaluator(tiny(), random_ids(1, 32))
    evaluator.preload({"a": 12.5})
    assert evaluator.score("a", [1.0] * 8) == FitnessResult(12.5)
    assert evaluator.evaluations == 0


def test_unknown_fitness_kind_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown fitness 'bleu'; use one of: ppl"):
        Evaluator(tiny(), random_ids(1, 32), kind="bleu")


def test_a_head_transform_we_do_not_know_is_refused():
    model = tiny()
    model.config.logit_scale = 2.0  # our head would scale, Llama's forward does not
    with pytest.raises(ModelError, match="transforms its logits"):
        Evaluator(model, random_ids(1, 32))


def test_ignored_targets_add_nothing_to_the_summed_nll():
    """nll_sum over a split sequence with IGNORE targets equals the whole sequence's NLL (context parallelism)."""
    from longrope_search.fitness import IGNORE, _decoder, nll_sum

    model, ids = tiny(), random_ids(1, 50)[0]  # (L,)
    with torch.inference_mode():
        hidden = _decoder(model)(input_ids=ids[None], use_cache=False).last_hidden_state[0]  # (L, H)
    targets = torch.cat([ids[1:], torch.tensor([IGNORE])])  # (L,): the last position predicts nothing
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))  # any split of the positions
    parts = [nll_sum(model, hidden[order[i::3]], targets[order[i::3]], chunk_size=4) for i in range(3)]
    assert sum(p.item() for p in parts) / 49 == pytest.approx(sequence_nll(model, ids, 7), rel=1e-6)


def test_race_stops_a_candidate_once_its_paired_gap_exceeds_the_margin():
    from longrope_search.fitness import Race

    race = Race(bar=(2.0, 3.0, 1.0, 2.5), margin=0.1)
    assert not race.lost([])
    assert not race.lost([2.05])  # 0.05 behind: still in the race
    assert race.lost([2.2])  # 0.2 behind after one sample
    assert not race.lost([2.2, 2.9])  # (0.2 - 0.1) / 2 = 0.05: back in
    assert not race.lost([9.0, 9.0, 9.0, 9.0])  # fully scored: never "rejected" after its last sample


def test_a_rejected_candidate_keeps_its_partial_score_and_costs_less():
    from longrope_search.fitness import Race

    model = tiny()
    ids = random_ids(4, 48)
    full = perplexity(model, ids, 16)
    assert not full.rejected and full.forward_tokens == 4 * 48 and len(full.nlls) == 4
    # a bar far better than this candidate: out after the first sample
    stopped = perplexity(model, ids, 16, race=Race(tuple(v - 1.0 for v in full.nlls), 0.05))
    assert stopped.rejected and stopped.nlls == full.nlls[:1] and stopped.forward_tokens == 48
    assert stopped.ppl == pytest.approx(math.exp(full.nlls[0]))
    # a bar it beats: scored to the end, the same result as without a race
    kept = perplexity(model, ids, 16, race=Race(tuple(v + 1.0 for v in full.nlls), 0.05))
    assert not kept.rejected and kept.nlls == full.nlls
    # the evaluator never scores a key twice, rejected or not
    evaluator = Evaluator(model, ids, 16)
    first = evaluator.score("k", [1.0] * 8, race=Race(tuple(v - 1.0 for v in full.nlls), 0.05))
    assert first.rejected and evaluator.score("k", [1.0] * 8) is first
