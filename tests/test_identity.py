"""RunIdentity: what a resume compares, read back from checkpoints of this and earlier versions."""

from longrope_search.identity import RunIdentity

SAVED = {  # a start line's fingerprint as a run from before the weights check wrote it (ppl fitness, no validation)
    "model": "builtin:tiny@0123456789abcdef", "target_length": 1024, "original_length": 128, "rotary_dim": 16,
    "rope_base": 10000.0, "data": "aaaa", "tokenizer": "bbbb", "space": [64.0, 1.0, 0.01, True, [0, 2]],
    "mscale": 1.2, "seeds": ["ntk", "pi", "yarn"], "prior": None, "short": False,
}


def test_an_identity_reads_back_to_the_same_json_and_compares_field_by_field():
    saved = RunIdentity.from_json(SAVED)
    assert saved.to_json() == SAVED and saved.weights is None and saved.other == {}
    now = RunIdentity.from_json({**SAVED, "weights": {"model.safetensors": "10:ff"}})
    assert now.differences(saved) == []  # a field added since the checkpoint is not compared
    changed = RunIdentity.from_json({**SAVED, "weights": {"model.safetensors": "10:ee"}, "data": "cccc"})
    assert changed.differences(now) == ["data: checkpoint has 'aaaa', now 'cccc'",
                                        "weights model.safetensors: checkpoint has '10:ff', now '10:ee'"]


def test_a_field_this_version_does_not_know_is_kept_and_compared():
    saved = RunIdentity.from_json({**SAVED, "retired": 3})
    assert saved.other == {"retired": 3} and saved.to_json() == {**SAVED, "retired": 3}
    assert RunIdentity.from_json(SAVED).differences(saved) == ["retired: checkpoint has 3, now None"]


def test_an_identity_missing_a_field_reads_and_differs_instead_of_failing():
    partial = RunIdentity.from_json({k: v for k, v in SAVED.items() if k != "seeds"})
    assert RunIdentity.from_json(SAVED).differences(partial) == ["seeds: checkpoint has None, now ['ntk', 'pi', 'yarn']"]
