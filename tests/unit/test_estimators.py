"""Estimator specs: what the allowlist builds, what it refuses, and the JSON form of parameters."""

from __future__ import annotations

from typing import Any

import pytest
from river import compose, ensemble, linear_model, naive_bayes, optim, preprocessing, tree
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.pipeline import Pipeline as SkPipeline
from sklearn.preprocessing import StandardScaler as SkStandardScaler

from streamml import estimators
from streamml.errors import ValidationError

RIVER_SPEC = "preprocessing.StandardScaler | linear_model.LogisticRegression"


@pytest.mark.parametrize(
    "spec",
    [RIVER_SPEC, "river.preprocessing.StandardScaler | river.linear_model.LogisticRegression"],
)
def test_river_spec_with_or_without_prefix_builds_a_river_pipeline(spec: str) -> None:
    model = estimators.build(spec)
    assert isinstance(model, compose.Pipeline)
    steps = list(model.steps.values())
    assert [type(s) for s in steps] == [preprocessing.StandardScaler, linear_model.LogisticRegression]
    assert estimators.library_of(spec) == "river"


def test_parse_spec_keeps_the_written_name_and_the_full_path() -> None:
    steps = estimators.parse_spec(" preprocessing.StandardScaler|river.linear_model.LogisticRegression ")
    assert [(s.path, s.short) for s in steps] == [
        ("river.preprocessing.StandardScaler", "preprocessing.StandardScaler"),
        ("river.linear_model.LogisticRegression", "river.linear_model.LogisticRegression"),
    ]


def test_single_river_step_is_the_estimator_itself() -> None:
    model = estimators.build(
        "tree.HoeffdingTreeClassifier", {"tree.HoeffdingTreeClassifier": {"grace_period": 50}}
    )
    assert isinstance(model, tree.HoeffdingTreeClassifier)
    assert model.grace_period == 50


def test_each_build_is_a_fresh_estimator() -> None:
    assert estimators.build(RIVER_SPEC) is not estimators.build(RIVER_SPEC)


def test_sklearn_spec_builds_a_pipeline_with_params() -> None:
    spec = "sklearn.preprocessing.StandardScaler | sklearn.linear_model.LogisticRegression"
    model = estimators.build(spec, {"sklearn.linear_model.LogisticRegression": {"C": 0.5, "max_iter": 50}})
    assert isinstance(model, SkPipeline)
    scaler, clf = (step for _name, step in model.steps)
    assert isinstance(scaler, SkStandardScaler)
    assert isinstance(clf, SkLogisticRegression)
    assert (clf.C, clf.max_iter) == (0.5, 50)
    assert estimators.library_of(spec) == "sklearn"


def test_single_sklearn_step_is_the_estimator_itself() -> None:
    model = estimators.build("sklearn.linear_model.LogisticRegression")
    assert type(model) is SkLogisticRegression


def test_params_may_be_keyed_by_the_full_path() -> None:
    model = estimators.build(RIVER_SPEC, {"river.linear_model.LogisticRegression": {"l2": 0.25}})
    assert model["LogisticRegression"].l2 == 0.25


def test_nested_estimator_params_are_built() -> None:
    params = {
        "linear_model.LogisticRegression": {"optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}}}
    }
    model = estimators.build("linear_model.LogisticRegression", params)
    assert isinstance(model.optimizer, optim.SGD)
    assert model.optimizer.lr.learning_rate == 0.05


def test_nested_estimator_with_full_prefix_and_no_params() -> None:
    params = {"linear_model.LinearRegression": {"optimizer": {"class": "river.optim.Adam"}}}
    model = estimators.build("linear_model.LinearRegression", params)
    assert isinstance(model.optimizer, optim.Adam)


def test_nested_estimators_in_a_list_are_built() -> None:
    models = [
        {"class": "linear_model.LogisticRegression", "params": {"l2": 0.5}},
        {"class": "naive_bayes.GaussianNB"},
    ]
    model = estimators.build("ensemble.VotingClassifier", {"ensemble.VotingClassifier": {"models": models}})
    assert isinstance(model, ensemble.VotingClassifier)
    members = list(model.models)
    assert [type(m) for m in members] == [linear_model.LogisticRegression, naive_bayes.GaussianNB]
    assert members[0].l2 == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("os.system", r"does not name a class"),
        ("builtins.eval", r"does not name a class"),
        ("river.utils.math.dot", r"'river\.utils\.math\.dot' does not name a class"),
        ("sklearn.utils.Bunch", r"'sklearn\.utils\.Bunch' is not a River or scikit-learn estimator"),
        ("river.nothere.Model", r"unknown estimator module 'river\.nothere'"),
        ("linear_model.Nope", r"'river\.linear_model\.Nope' is not a class"),
        ("linear_model.LogisticRegression; import os", r"invalid estimator step"),
        ("__import__('os').system", r"invalid estimator step"),
        ("linear_model..LogisticRegression", r"invalid estimator step"),
        (".linear_model.LogisticRegression", r"invalid estimator step"),
        ("linear_model.LogisticRegression |", r"invalid estimator step"),
        ("", r"invalid estimator step"),
    ],
)
def test_specs_outside_the_allowlist_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        estimators.build(spec)


@pytest.mark.parametrize("path", ["os.system", "builtins.eval", "subprocess.Popen", "pickle.loads"])
def test_resolve_class_refuses_modules_outside_the_allowlist(path: str) -> None:
    with pytest.raises(
        ValidationError, match=r"is not allowed: estimators come only from river\., sklearn\."
    ):
        estimators.resolve_class(path)


def test_nested_class_outside_the_allowlist_is_refused() -> None:
    for nested in ("os.system", "builtins.Exception", "sklearn.utils.Bunch"):
        params = {"linear_model.LogisticRegression": {"optimizer": {"class": nested}}}
        with pytest.raises(ValidationError):
            estimators.build("linear_model.LogisticRegression", params)


def test_mixing_river_and_sklearn_steps_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"mixes River and scikit-learn steps"):
        estimators.build("preprocessing.StandardScaler | sklearn.linear_model.LogisticRegression")


def test_params_for_a_step_not_in_the_spec_are_refused() -> None:
    params = {"linear_model.LogisticRegression": {}, "tree.HoeffdingTreeClassifier": {"grace_period": 5}}
    with pytest.raises(ValidationError, match=r"steps not in the spec: \['tree\.HoeffdingTreeClassifier'\]"):
        estimators.build(RIVER_SPEC, params)


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        (
            RIVER_SPEC,
            {"linear_model.LogisticRegression": {"learning_rate": 0.1}},
            r"bad parameters for river\.linear_model\.[\w.]*LogisticRegression",
        ),
        (
            "sklearn.linear_model.LogisticRegression",
            {"sklearn.linear_model.LogisticRegression": {"not_a_param": 1}},
            r"bad parameters for sklearn\.linear_model\.[\w.]*LogisticRegression",
        ),
        (
            "linear_model.LogisticRegression",
            {"linear_model.LogisticRegression": {"optimizer": {"class": "optim.SGD", "params": {"rate": 1}}}},
            r"bad parameters for river\.optim\.[\w.]*SGD",
        ),
    ],
)
def test_bad_kwargs_are_a_validation_error(spec: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        estimators.build(spec, params)


def test_bad_parameter_value_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"bad parameters"):
        estimators.build("linear_model.PAClassifier", {"linear_model.PAClassifier": {"mode": 7}})


def test_encode_decode_params_round_trip() -> None:
    params = {
        "linear_model.LogisticRegression": {
            "l2": 0.1,
            "optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}},
        },
        "preprocessing.StandardScaler": {},
    }
    encoded = estimators.encode_params(params)
    assert encoded == {
        "linear_model.LogisticRegression": (
            '{"l2": 0.1, "optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}}}'
        ),
        "preprocessing.StandardScaler": "{}",
    }
    assert estimators.decode_params(encoded) == params
    model = estimators.build(RIVER_SPEC, estimators.decode_params(encoded))
    assert model["LogisticRegression"].l2 == 0.1
    assert model["LogisticRegression"].optimizer.lr.learning_rate == 0.05


def test_encoding_is_canonical() -> None:
    assert estimators.encode_params({"s": {"b": 1, "a": 2}}) == estimators.encode_params(
        {"s": {"a": 2, "b": 1}}
    )


def test_decode_params_of_invalid_json_names_the_step() -> None:
    with pytest.raises(ValidationError, match=r"parameters of 'tree\.X' are not valid JSON"):
        estimators.decode_params({"tree.X": "{grace_period: 5"})


@pytest.mark.parametrize(
    ("text", "kind"), [("[1, 2]", "list"), ("3", "int"), ('"x"', "str"), ("null", "NoneType")]
)
def test_decode_params_must_be_objects(text: str, kind: str) -> None:
    with pytest.raises(ValidationError, match=rf"parameters of 's' must be an object, got {kind}"):
        estimators.decode_params({"s": text})
