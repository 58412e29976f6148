"""Estimator specs: what the allowlist builds, what it refuses, and the JSON form of parameters."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from river import base as river_base
from river import compose, ensemble, linear_model, naive_bayes, optim, preprocessing, tree
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.pipeline import Pipeline as SkPipeline
from sklearn.preprocessing import StandardScaler as SkStandardScaler

from streamml import estimators, pipelines
from streamml.errors import ValidationError

REPO = Path(__file__).resolve().parents[2]
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
        (
            "sklearn.model_selection.KFold",
            r"'sklearn\.model_selection\.KFold' is not a River or scikit-learn",
        ),
        ("sklearn.utils.Bunch", r"'sklearn\.utils\.Bunch' is refused: sklearn\.utils holds helpers"),
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


# -- parameters are data, never capabilities -------------------------------------------------------------
PIPELINE = "sklearn.pipeline.Pipeline"
SCALER_STEP = ["scale", {"class": "sklearn.preprocessing.StandardScaler"}]
DATA_ONLY = r"estimator parameters are data, never files, callables or modules"


def one(spec: str, **params: Any) -> dict[str, dict[str, Any]]:
    return {spec: params}


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        (PIPELINE, {"steps": [SCALER_STEP], "memory": "/any/path"}),
        ("sklearn.cluster.FeatureAgglomeration", {"memory": "/any/path"}),
        ("sklearn.linear_model.LogisticRegression", {"memory": "cache"}),  # not its parameter: still refused
        ("linear_model.LogisticRegression", {"memory": "/any/path"}),
    ],
)
def test_memory_is_refused_on_every_class(spec: str, params: dict[str, Any]) -> None:
    with pytest.raises(
        ValidationError, match=rf"parameter 'memory' of [\w.]+ names a file or directory.*{DATA_ONLY}"
    ):
        estimators.build(spec, {spec: params})


def test_null_for_a_capability_parameter_is_its_default_and_accepted() -> None:
    model = estimators.build(PIPELINE, one(PIPELINE, steps=[SCALER_STEP], memory=None))
    assert model.memory is None


def test_a_directory_given_as_memory_is_never_written_to(tmp_path: Path) -> None:
    for spec, params in [
        (PIPELINE, {"steps": [SCALER_STEP], "memory": str(tmp_path)}),
        ("sklearn.cluster.AgglomerativeClustering", {"memory": str(tmp_path)}),
        (PIPELINE, {"steps": [SCALER_STEP], "memory": {"class": "sklearn.preprocessing.StandardScaler"}}),
    ]:
        with pytest.raises(ValidationError, match="parameter 'memory'"):
            estimators.build(spec, {spec: params})
        with pytest.raises(ValidationError, match="parameter 'memory'"):
            estimators.check_params(spec, {spec: params})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        # by name, on any class
        ("sklearn.compose.TransformedTargetRegressor", {"func": "os.system"}, r"'func' .* takes a callable"),
        ("sklearn.compose.TransformedTargetRegressor", {"inverse_func": "x"}, r"'inverse_func' .* takes a"),
        ("sklearn.linear_model.LogisticRegression", {"callback": "print"}, r"'callback' .* takes a callable"),
        ("linear_model.LogisticRegression", {"module": "os"}, r"'module' .* names a module to import"),
        ("sklearn.model_selection.GridSearchCV", {"pre_dispatch": "2*n_jobs"}, r"joblib evaluates"),
        ("sklearn.feature_selection.SelectFromModel", {"importance_getter": "coef_"}, r"attribute path"),
        ("sklearn.feature_extraction.text.CountVectorizer", {"input": "filename"}, r"open the files"),
        # by what the constructor expects: a function default, a Callable annotation, a callable constraint
        (
            "sklearn.feature_selection.SelectKBest",
            {"score_func": "chi2"},
            r"'score_func' .* takes a callable",
        ),
        (
            "sklearn.cluster.FeatureAgglomeration",
            {"pooling_func": "max"},
            r"'pooling_func' .* takes a callable",
        ),
        ("feature_extraction.BagOfWords", {"tokenizer": "split"}, r"'tokenizer' .* takes a callable"),
        (
            "sklearn.linear_model.RANSACRegressor",
            {"is_data_valid": "ok"},
            r"'is_data_valid' .* takes a callable",
        ),
        ("sklearn.svm.SVC", {"kernel": "os.system"}, r"'kernel' .* names a module or callable"),
        (
            "sklearn.svm.SVC",
            {"kernel": {"class": "sklearn.linear_model.LogisticRegression"}},
            r"'kernel' .* takes a callable, so an estimator given there would be called",
        ),
        # by what a value looks like, where the parameter's default is not a string
        ("sklearn.svm.SVC", {"class_weight": "/etc/passwd"}, r"'class_weight' .* names a file or directory"),
        ("sklearn.svm.SVC", {"class_weight": "~/x"}, r"names a file or directory"),
        ("sklearn.svm.SVC", {"class_weight": "..\\x"}, r"names a file or directory"),
        ("linear_model.LogisticRegression", {"l2": "os.system"}, r"'l2' .* names a module or callable"),
        ("linear_model.LogisticRegression", {"l2": ["builtins.eval"]}, r"names a module or callable"),
        (
            "linear_model.LogisticRegression",
            {"optimizer": {"class": "optim.SGD", "params": {"lr": "subprocess.Popen"}}},
            r"parameter 'lr' of river\.optim\.SGD names a module or callable",
        ),
    ],
)
def test_parameters_that_grant_capabilities_are_refused(
    spec: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        estimators.build(spec, {spec: params})


def test_callable_parameters_keep_the_librarys_own_names() -> None:
    svc = estimators.build("sklearn.svm.SVC", one("sklearn.svm.SVC", kernel="linear"))
    assert svc.kernel == "linear"
    knn = "sklearn.neighbors.KNeighborsClassifier"
    assert estimators.build(knn, one(knn, weights="distance", n_jobs=2)).weights == "distance"
    vec = "sklearn.feature_extraction.text.CountVectorizer"  # a string default: its own vocabulary
    assert estimators.build(vec, one(vec, token_pattern=r"(?u)\b\w\.\w+\b")).token_pattern.endswith("+\\b")


@pytest.mark.parametrize(
    "spec",
    [
        "sklearn.preprocessing.FunctionTransformer",
        "sklearn.pipeline.FunctionTransformer",  # the same class under another public name
        "compose.FuncTransformer",
        "river.compose.TargetTransformRegressor",
    ],
)
def test_function_transformers_are_refused_as_classes(spec: str) -> None:
    with pytest.raises(ValidationError, match=r"is refused: [\w.]+ calls the functions? it is given"):
        estimators.build(spec)


def test_a_function_transformer_nested_in_a_pipeline_is_refused() -> None:
    step = ["f", {"class": "sklearn.preprocessing.FunctionTransformer", "params": {"validate": True}}]
    with pytest.raises(ValidationError, match=r"FunctionTransformer' is refused"):
        estimators.build(PIPELINE, one(PIPELINE, steps=[SCALER_STEP, step]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sklearn.utils.Bunch", r"sklearn\.utils holds helpers"),
        ("sklearn.datasets.Anything", r"sklearn\.datasets holds dataset loaders"),
        ("river.datasets.Phishing", r"river\.datasets holds dataset loaders"),
        ("river.stream.Cache", r"river\.stream holds readers of files"),
        ("sklearn.externals.Anything", r"sklearn\.externals holds vendored"),
        ("sklearn.experimental.enable_halving_search_cv.X", r"sklearn\.experimental holds switches"),
        ("sklearn.utils._mocking.CheckingClassifier", r"'_mocking' is a private or test module"),
        ("sklearn.linear_model._logistic.LogisticRegression", r"'_logistic' is a private or test module"),
        ("river.linear_model.test_lin_reg.X", r"'test_lin_reg' is a private or test module"),
    ],
)
def test_modules_that_are_not_estimators_are_refused_before_import(spec: str, message: str) -> None:
    module = spec.rpartition(".")[0]
    was_imported = module in sys.modules
    with pytest.raises(ValidationError, match=rf"is refused: {message}"):
        estimators.build(spec)
    assert (module in sys.modules) == was_imported


def test_a_class_that_cannot_be_resolved_is_a_validation_error() -> None:
    # scikit-learn raises ImportError from the module's __getattr__ until the experiment is enabled
    with pytest.raises(ValidationError, match=r"'sklearn\.impute\.IterativeImputer' cannot be used"):
        estimators.build("sklearn.impute.IterativeImputer")


@pytest.mark.parametrize("n_jobs", [-1, -2, 0, 3, 64, True, "2", 1.0])
def test_n_jobs_is_capped(n_jobs: Any) -> None:
    spec = "sklearn.ensemble.RandomForestClassifier"
    with pytest.raises(ValidationError, match=r"parameter 'n_jobs' of .* use 1 to 2 parallel jobs"):
        estimators.build(spec, one(spec, n_jobs=n_jobs))


@pytest.mark.parametrize("n_jobs", [None, 1, 2])
def test_n_jobs_up_to_two_is_accepted(n_jobs: int | None) -> None:
    spec = "sklearn.ensemble.RandomForestClassifier"
    assert estimators.build(spec, one(spec, n_jobs=n_jobs)).n_jobs == n_jobs


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, math.nan]])
def test_non_finite_floats_are_refused(value: Any) -> None:
    with pytest.raises(ValidationError, match=r"parameter 'l2' of .* numbers must be finite"):
        estimators.build("linear_model.LogisticRegression", one("linear_model.LogisticRegression", l2=value))


@pytest.mark.parametrize("text", ['{"l2": NaN}', '{"l2": Infinity}', '{"l2": -Infinity}'])
def test_non_finite_floats_from_json_are_refused(text: str) -> None:
    params = estimators.decode_params({"linear_model.LogisticRegression": text})
    with pytest.raises(ValidationError, match=r"numbers must be finite"):
        estimators.check_params("linear_model.LogisticRegression", params)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((0.1,), r"is a tuple: a value is a JSON scalar"),
        ({0.1}, r"is a set"),
        (b"x", r"is a bytes"),
        (object(), r"is a object"),
        ({"a": [1]}, r"an object whose values are not all scalars"),
        ({"a": {"b": 1}}, r"an object whose values are not all scalars"),
        ({"class": "optim.SGD", "lr": 1}, r"nested estimator with unknown keys \['lr'\]"),
        ({"class": 7}, r"a nested estimator's 'class' must be a name"),
        ({"class": "optim.SGD | optim.Adam"}, r"a nested estimator's 'class' is one class"),
        ({"class": "optim.SGD", "params": [1]}, r"parameters of river\.optim\.SGD must be an object"),
    ],
)
def test_values_of_other_shapes_are_refused(value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        estimators.build("linear_model.LogisticRegression", one("linear_model.LogisticRegression", l2=value))


def test_an_object_of_scalars_is_accepted() -> None:
    spec = "sklearn.svm.SVC"
    assert estimators.build(spec, one(spec, class_weight={"0": 1.0, "1": 2.5})).class_weight == {
        "0": 1.0,
        "1": 2.5,
    }
    assert estimators.build("compose.Renamer", one("compose.Renamer", mapping={"a": "b"})).mapping == {
        "a": "b"
    }


@pytest.mark.parametrize("name", ["_private", "not an identifier", "a.b"])
def test_parameter_names_must_be_public_identifiers(name: str) -> None:
    with pytest.raises(ValidationError, match=r"has an invalid parameter name"):
        estimators.build("linear_model.LogisticRegression", {"linear_model.LogisticRegression": {name: 1}})


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (_deep(100_000), r"nested more than 8 levels deep"),
        ("x" * 10_000_000, r"a string of 10000000 characters; at most 1000"),
        (list(range(1_000_000)), r"a list of 1000000 items; at most 1000"),
        ([list(range(1000))] * 20, r"more than 10000 values in all"),
        ({str(i): i for i in range(100_000)}, r"has 100000 entries; at most 1000"),
    ],
)
def test_huge_or_deep_values_are_refused_quickly(value: Any, message: str) -> None:
    params = one("linear_model.LogisticRegression", l2=value)
    start = time.perf_counter()
    with pytest.raises(ValidationError, match=message):
        estimators.build("linear_model.LogisticRegression", params)
    assert time.perf_counter() - start < 0.5


def test_nesting_up_to_the_limit_is_accepted_by_the_checks() -> None:
    spec = "linear_model.LogisticRegression"
    estimators.check_params(spec, one(spec, l2=_deep(7)))  # 8 levels, the outer list included
    with pytest.raises(ValidationError, match=r"nested more than 8 levels deep"):
        estimators.check_params(spec, one(spec, l2=_deep(8)))


def test_too_many_parameters_are_refused() -> None:
    params = one("linear_model.LogisticRegression", **{f"p{i}": i for i in range(65)})
    with pytest.raises(ValidationError, match=r"is given 65 parameters; at most 64"):
        estimators.build("linear_model.LogisticRegression", params)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000, r"are not valid JSON"),
        ('{"l2": ' + "9" * 5000 + "}", r"are not valid JSON"),  # beyond Python's int digit limit
        ('{"a": "' + "x" * 200_000 + '"}', r"are 200009 characters of JSON; at most 100000"),
    ],
)
def test_hostile_json_is_refused_quickly(text: str, message: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValidationError, match=rf"parameters of 's' {message}"):
        estimators.decode_params({"s": text})
    assert time.perf_counter() - start < 0.5


class _Boom(river_base.Base):
    """An allowlisted-looking estimator whose constructor raises what no one catches on purpose."""

    built = 0

    def __init__(self, x: int = 1) -> None:
        _Boom.built += 1
        raise RuntimeError("boom")


_Boom.__module__ = "river.optim"


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> type[_Boom]:
    monkeypatch.setattr(optim, "Boom", _Boom, raising=False)
    monkeypatch.setattr(_Boom, "built", 0)
    return _Boom


def test_any_constructor_exception_is_a_validation_error(boom: type[_Boom]) -> None:
    with pytest.raises(
        ValidationError, match=r"bad parameters for river\.optim\._Boom: RuntimeError: boom"
    ) as info:
        estimators.build("optim.Boom")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_checks_run_before_any_constructor(boom: type[_Boom]) -> None:
    estimators.check_params("optim.Boom", {"optim.Boom": {"x": 2}})  # valid, and nothing is constructed
    params = {"linear_model.LogisticRegression": {"l2": "/tmp/x"}}
    with pytest.raises(
        ValidationError, match=r"'l2' of river\.linear_model\.LogisticRegression names a file"
    ):
        estimators.build("optim.Boom | linear_model.LogisticRegression", params)
    assert boom.built == 0


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_repo_pipeline_still_builds(path: Path) -> None:
    definition = pipelines.to_definition(pipelines.load_file(path), "t.raw").to_avro()
    assert definition["models"]
    for model in definition["models"]:  # as the learner and the trainer decode them from the topic
        params = estimators.decode_params(model["params"])
        estimators.check_params(model["estimator_spec"], params)
        assert estimators.build(model["estimator_spec"], params) is not None
