"""Config schema: lengths, overrides, every error at once with nearest-key hints, shipped configs valid."""

from pathlib import Path

import pytest

from longrope_search.config import PAPER_N_HAT, apply_overrides, from_dict, load_config, parse_length
from longrope_search.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("text, expected", [("256k", 262144), ("2m", 2097152), ("4096", 4096), (1024, 1024),
                                            ("8x", 1024), ("1.5x", 192), ("128K", 131072)])
def test_parse_length(text, expected):
    assert parse_length(text, original_length=128) == expected


@pytest.mark.parametrize("text", ["", "12q", "x8", "-4k"])
def test_parse_length_rejects(text):
    with pytest.raises(ConfigError, match="write it as 4096, 256k, 2m or 8x"):
        parse_length(text, 128)


def test_defaults_are_the_papers_settings():
    s = from_dict({}).search
    assert (s.population, s.generations, s.parents, s.mutations, s.crossovers, s.mutation_prob) == (64, 40, 32, 16, 16, 0.3)
    assert s.n_hat == PAPER_N_HAT and s.max_factor is None and s.monotonic


def test_all_errors_reported_at_once_in_one_line():
    with pytest.raises(ConfigError) as info:
        from_dict({"search": {"populaton": 8, "generations": -1, "target": "abc"}, "dta": {}})
    message = str(info.value)
    assert "\n" not in message
    assert "search.populaton: unknown key (did you mean 'population'?)" in message
    assert "search.generations: Input should be greater than or equal to 0" in message
    assert "search.target: cannot read length 'abc'" in message
    assert "dta: unknown key (did you mean 'data'?)" in message


def test_overrides_parse_yaml_values_and_reject_garbage():
    raw = apply_overrides({"search": {"generations": 3}}, ["search.generations=10", "search.n_hat=[0, 4]",
                                                           "model.name=builtin:tiny"])
    config = from_dict(raw)
    assert config.search.generations == 10 and config.search.n_hat == [0, 4] and config.model.name == "builtin:tiny"
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_overrides({}, ["search.generations"])
    with pytest.raises(ConfigError, match="model.name: Input should be a valid string"):
        from_dict(apply_overrides({}, ["model.name.x=1"]))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate_and_start_with_their_command(path):
    from longrope_search.stages_file import has_stages, load_stages

    configs = [c for _, c in load_stages(path)[1]] if has_stages(path) else [load_config(path)]
    first = path.read_text().splitlines()[0]
    command = first.removeprefix("# torchrun --nproc-per-node 8 -m longrope_search search").removeprefix("# longrope search")
    if first.startswith("# longrope finetune "):  # a fine-tune's config: `longrope finetune RUN --config ... --out DIR`
        command = " " + first.removeprefix("# longrope finetune ").split(" ", 1)[1]
    assert command.startswith(" --config configs/") and path.name in first
    assert all(c.search.parents <= c.search.population for c in configs)


def test_an_override_value_that_is_not_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["search.n_hat=[0, 4"])


def test_a_finetune_stage_written_empty_is_the_shared_settings(tmp_path):
    from longrope_search.errors import ConfigError
    from longrope_search.stages_file import load_stages

    path = tmp_path / "stages.yaml"
    path.write_text("stages:\n  - {name: ft, finetune: null}\n")
    with pytest.raises(ConfigError, match="a finetune stage trains the factors of the search stage before it"):
        load_stages(path)
