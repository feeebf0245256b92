"""Settings stated once: the option fields' defaults, rules and building, and every place that
repeats them (the click options, the service's job model) held to them."""

from __future__ import annotations

import typing

import pytest

from catalog.errors import CatalogError
from catalog.jobs.settings import IngestSettings, InterveneSettings
from catalog.methods import REGISTRY
from catalog.methods.accpp.settings import AccppSettings
from catalog.methods.sad.settings import SadSettings
from catalog.settings import build, check, defaults, fields_of, flag_of

ALL_SETTINGS = [IngestSettings, InterveneSettings, *(m.settings for m in REGISTRY.values())]


def test_defaults_are_the_documented_ones():
    assert defaults(IngestSettings)["n_prompts"] == 256  # the CLI's value won over Python's old 64
    assert defaults(SadSettings) == {"attn_threshold": 0.5, "sv_threshold": 1.0, "edge_threshold": 0.7,
                                     "append_constant": True, "sink_attention": 0.3, "sink_head_share": 0.15,
                                     "sink_min_heads": 8, "keep_sinks": False}
    assert defaults(AccppSettings)["threshold"] == "dynamic" and defaults(AccppSettings)["ig_steps"] == 64
    assert defaults(InterveneSettings)["mode"] == "local"


def test_flags_follow_the_field_names_unless_renamed():
    flags = {f.name: flag_of(f) for f in fields_of(IngestSettings)}
    assert flags["n_prompts"] == "--n-prompts" and flags["prompts_file"] == "--prompts"
    assert {f.name: flag_of(f) for f in fields_of(InterveneSettings)}["run_id"] == "--run"


@pytest.mark.parametrize("settings_class, values, says", [
    (SadSettings, {"attn_threshold": 1.5}, "--attn-threshold must be in (0, 1], got 1.5"),
    (SadSettings, {"sv_threshold": 0}, "--sv-threshold must be positive, got 0"),
    (IngestSettings, {"n_prompts": 0}, "--n-prompts must be at least 1, got 0"),
    (IngestSettings, {"dtype": "float16"}, "--dtype must be one of float32, bfloat16, not 'float16'"),
    (AccppSettings, {"threshold": "1.5"}, "--threshold must be 'dynamic' or a number in (0, 1], got 1.5"),
    (AccppSettings, {"threshold": "often"}, "--threshold must be 'dynamic' or a number, got 'often'"),
    (AccppSettings, {"seeding": "none"}, "--seeding none decomposes nothing without --heads L.H,..."),
    (AccppSettings, {"tau": 2.0}, "--tau must be in (0, 1], got 2.0"),
    (InterveneSettings, {"top_edges": 0}, "--top-edges must be at least 1, got 0"),
    (IngestSettings, {"n_promts": 3}, "unknown setting n_promts for IngestSettings"),
])
def test_a_broken_rule_is_one_line_naming_the_flag(settings_class, values, says):
    with pytest.raises(CatalogError) as err:
        build(settings_class, values)
    assert str(err.value).startswith(says)
    assert "\n" not in str(err.value)


def test_build_makes_user_strings_typed():
    made = build(AccppSettings, threshold="0.3", heads="9.9, 10.0", dest_roles=["end", "S2"])
    assert made.threshold == 0.3 and made.heads == ((9, 9), (10, 0)) and made.dest_roles == ("end", "S2")
    assert made.record()["heads"] == ["9.9", "10.0"]
    assert build(AccppSettings).threshold == "dynamic"
    check(SadSettings())  # the defaults hold their own rules


def test_every_cli_option_has_its_settings_default():
    """Each flag of `ingest` and `intervene` is a settings field, with that field's default (an
    empty tuple is an option not given), help and choices."""
    from catalog.cli.ingest import ingest
    from catalog.cli.intervene import intervene

    from catalog.jobs.settings import EngineSettings

    for command, classes in ((ingest, [IngestSettings, SadSettings, AccppSettings, EngineSettings]),
                             (intervene, [InterveneSettings])):
        resolved = command.make_context(command.name, ["--db", "unused.duckdb"]).params
        fields = {f.name: f for cls in classes for f in fields_of(cls)}
        options = {p.name: p for p in command.params if p.name not in ("db_path", "server")}
        assert set(options) == set(fields), command.name
        for name, field in fields.items():
            default = None if field.default == () else field.default
            assert resolved[name] == default, name
            assert flag_of(field) in options[name].opts, name
            if field.metadata.get("choices"):
                assert tuple(options[name].type.choices) == tuple(field.metadata["choices"]), name
            assert field.metadata["help"][1:] in options[name].help or \
                field.metadata["help"][1:].split(": ", 1)[-1] in options[name].help, name


def test_the_service_job_model_repeats_the_settings_fields():
    """The service's IngestSettings (pydantic, typed for JSON) has every field of the job's and the
    methods' settings, with their defaults and choices, and nothing else."""
    from catalog.service.jobs import IngestSettings as JobModel

    fields = {f.name: f for cls in (IngestSettings, SadSettings, AccppSettings) for f in fields_of(cls)}
    assert set(JobModel.model_fields) == set(fields)
    for name, field in fields.items():
        model_field = JobModel.model_fields[name]
        assert model_field.default == (None if field.default == () else field.default), name
        if field.metadata.get("choices"):
            assert set(typing.get_args(model_field.annotation)) == set(field.metadata["choices"]), name


def test_a_setting_of_another_method_is_refused_by_the_library_as_by_the_cli():
    from catalog.jobs.ingest import resolve_settings

    with pytest.raises(CatalogError, match=r"^--tau applies to --method accpp, not to --method sad$"):
        resolve_settings(tau=0.5)
    job, chosen, method_settings = resolve_settings(IngestSettings(n_prompts=8), method="accpp", seeding="prob")
    assert (job.n_prompts, job.method, chosen.name, method_settings.seeding) == (8, "accpp", "accpp", "prob")
    with pytest.raises(CatalogError, match="not the AccppSettings of --method accpp"):
        resolve_settings(method="accpp", method_settings=SadSettings())
