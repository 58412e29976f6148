"""Trainer logic without a broker: request checks and their reasons, the slice's dataset, seeded training
with a grid, the River-style adapter the predictor calls, replay determinism and the published records."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from river import datasets
from sklearn.feature_extraction import DictVectorizer
from sklearn.model_selection import ParameterGrid

from streamml import artifacts, estimators, pipelines
from streamml.codec import codec_for
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.trainer import (
    BatchModel,
    Dataset,
    Plan,
    RequestRejectedError,
    TrainerState,
    TrainingFailedError,
    assemble,
    check_dataset,
    check_ranges,
    expand_grid,
    label_map,
    plan_request,
    result_record,
    split_indices,
    train,
    version_record,
)

REPO = Path(__file__).resolve().parents[2]
KEY = b"trainer-test-key"
CATALOGUE = Catalogue(Settings(topic_prefix="t", _env_file=None))
FEATURES = "t.phishing.features"
LABELS = "t.phishing.labels"
LOGREG = "sklearn.linear_model.LogisticRegression"
SCALED_LOGREG = f"sklearn.preprocessing.StandardScaler | {LOGREG}"
PHISHING = list(datasets.Phishing())  # 1250 events, boolean labels


def definition(name: str, **overrides: Any) -> dict[str, Any]:
    spec = pipelines.load_file(REPO / "pipelines" / f"{name}.yaml").model_copy(update=overrides)
    return pipelines.to_definition(spec, f"t.{name}.raw").to_avro()


def state(*defs: dict[str, Any]) -> TrainerState:
    st = TrainerState()
    for d in defs or (definition("phishing"),):
        st.on_pipeline(d)
    return st


def request(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": "r-1",
        "pipeline": "phishing",
        "model_name": "batch",
        "estimator_spec": LOGREG,
        "params": {},
        "param_grid": {},
        "data_ranges": [{"topic": FEATURES, "partition": 0, "start_offset": 0, "end_offset": 1250}],
        "time_from": None,
        "time_to": None,
        "validation_split": 0.2,
        "seed": 7,
        "reason": "",
        "requested_by": "test",
        "requested_at": 0,
    }
    base.update(overrides)
    return base


def plan(st: TrainerState | None = None, **overrides: Any) -> Plan:
    return plan_request(request(**overrides), st or state(), CATALOGUE)


def phishing_data(n: int | None = None) -> Dataset:
    rows = PHISHING[:n] if n else PHISHING
    return Dataset(features=[dict(x) for x, _ in rows], labels=[y for _, y in rows], read=len(rows))


def fv_bytes(
    event_id: str,
    features: dict[str, Any],
    label: Any = None,
    pipeline: str = "phishing",
    event_time: int = 0,
) -> bytes:
    return codec_for("FeatureVector").encode(
        {"event_id": event_id, "key": None, "pipeline": pipeline, "pipeline_revision": 1,
         "features": features, "label": label, "event_time": event_time, "feature_time": 0, "source": None}
    )  # fmt: skip


# -- control state ---------------------------------------------------------------------------------------
def test_state_numbers_versions_per_model_and_follows_the_live_version() -> None:
    st = state()
    assert st.next_version("phishing", "batch") == 1
    st.on_version({"pipeline": "phishing", "model_name": "batch", "version": 4})
    st.on_version({"pipeline": "phishing", "model_name": "batch", "version": 2})  # an older one arriving late
    st.on_version({"pipeline": "phishing", "model_name": "online", "version": 9})
    assert st.next_version("phishing", "batch") == 5
    assert st.next_version("phishing", "batch") == 5  # taken only once published (on_version)
    st.on_version({"pipeline": "phishing", "model_name": "batch", "version": 5})
    assert st.next_version("phishing", "batch") == 6
    assert st.next_version("phishing", "other") == 1

    assert plan(st).parent_version is None
    for action, version in (("PROMOTE", 3), ("SHADOW", 5), ("DISCARD", 5), ("ROLLBACK", 2)):
        st.on_promotion({"pipeline": "phishing", "action": action, "version": version})
    assert plan(st).parent_version == 2  # SHADOW/DISCARD do not change what serves


def test_deleted_pipelines_are_rejected_until_applied_again() -> None:
    st = state()
    st.on_pipeline({**definition("phishing"), "deleted": True})
    with pytest.raises(RequestRejectedError, match="pipeline 'phishing' was deleted"):
        plan(st)
    st.on_pipeline(None, key="phishing")  # the tombstone that follows
    with pytest.raises(RequestRejectedError, match="was deleted"):
        plan(st)
    st.on_pipeline(definition("phishing"))
    assert plan(st).features_topic == FEATURES


# -- request checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"pipeline": "nope"}, r"unknown pipeline 'nope' \(known: phishing\); apply it first"),
        ({"estimator_spec": "os.system"}, r"estimator 'os.system' is not allowed: .*\(sklearn\.\*\)"),
        ({"estimator_spec": "builtins.eval"}, "estimator 'builtins.eval' is not allowed"),
        ({"estimator_spec": "linear_model.LogisticRegression"}, "is a River \\(online\\) estimator"),
        ({"estimator_spec": "river.tree.HoeffdingTreeClassifier"}, "is a River \\(online\\) estimator"),
        ({"estimator_spec": "sklearn.model_selection.KFold"}, "is not a River or scikit-learn estimator"),
        ({"estimator_spec": "sklearn.utils.Bunch"}, r"'sklearn.utils.Bunch' is refused"),
        ({"estimator_spec": "sklearn.linear_model.NoSuchModel"}, "is not a class in sklearn.linear_model"),
        ({"estimator_spec": "sklearn.linear_model.LinearRegression"}, "is not a classifier, but pipeline"),
        ({"estimator_spec": "os.system; rm -rf /"}, "invalid estimator step"),
        ({"params": {LOGREG: "{C: 1"}}, f"parameters of '{LOGREG}' are not valid JSON"),
        ({"params": {"sklearn.svm.SVC": "{}"}}, "not a step of the spec"),
        ({"params": {LOGREG: '{"no_such_param": 1}'}}, "bad parameters for sklearn.linear_model"),
        ({"model_name": "online"}, "belongs to the pipeline's online \\(River\\) model"),
        ({"model_name": "a/b"}, "invalid model_name"),
        ({"validation_split": 0.0}, "validation_split must be between 0 and 1"),
        ({"validation_split": 1.0}, "validation_split must be between 0 and 1"),
        ({"seed": -1}, "seed must be between 0 and 4294967295"),
        ({"data_ranges": []}, "no training data: give data_ranges"),
        ({"time_from": 5}, "either as data_ranges or as time_from/time_to, not both"),
        ({"data_ranges": [], "time_from": 10, "time_to": 10}, "empty time range"),
        (
            {"param_grid": {"sklearn.svm.SVC.C": ["1"]}},
            "must be '<step>.<parameter>' with a step of the spec",
        ),
        ({"param_grid": {f"{LOGREG}.C": []}}, "has no candidate values"),
        ({"param_grid": {f"{LOGREG}.C": ["one"]}}, "is not JSON"),
        (
            {"param_grid": {f"{LOGREG}.C": ["1"] * 9, f"{LOGREG}.tol": ["1"] * 8}},
            "72 combinations; at most 64",
        ),
        ({"param_grid": {f"{LOGREG}.not_a_param": ["1"]}}, "bad parameters for"),
    ],
)
def test_bad_requests_are_rejected_with_a_reason(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(RequestRejectedError, match=reason):
        plan(**overrides)


def test_memory_in_request_params_or_grid_is_rejected_and_never_written(tmp_path: Path) -> None:
    memory = json.dumps(str(tmp_path))
    pipeline = "sklearn.pipeline.Pipeline"
    steps = [["clf", {"class": LOGREG}]]
    cached = json.dumps({"steps": steps, "memory": str(tmp_path)})
    scaler = "sklearn.preprocessing.StandardScaler"
    for overrides in (
        {"params": {LOGREG: json.dumps({"memory": str(tmp_path)})}},
        {"param_grid": {f"{LOGREG}.memory": [memory]}},
        {"estimator_spec": SCALED_LOGREG, "param_grid": {f"{scaler}.memory": [memory]}},
        {"estimator_spec": pipeline, "params": {pipeline: cached}},
        {"estimator_spec": pipeline, "params": {pipeline: json.dumps({"steps": steps})},
         "param_grid": {f"{pipeline}.memory": ["null", memory]}},
    ):  # fmt: skip
        with pytest.raises(
            RequestRejectedError,
            match=r"parameter 'memory' of sklearn\.[\w.]+ names a file or directory .*: estimator parameters "
            "are data, never files, callables or modules",
        ):
            plan(**overrides)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"params": {LOGREG: '{"n_jobs": -1}'}}, r"parameter 'n_jobs' of .* use 1 to 2 parallel jobs"),
        ({"param_grid": {f"{LOGREG}.n_jobs": ["1", "64"]}}, r"parameter 'n_jobs' of .* use 1 to 2"),
        ({"params": {LOGREG: '{"callback": "os.system"}'}}, r"parameter 'callback' .* takes a callable"),
        ({"param_grid": {f"{LOGREG}.C": ['"os.system"']}}, r"parameter 'C' .* names a module or callable"),
        ({"param_grid": {f"{LOGREG}.C": ["1.0", "NaN"]}}, r"parameter 'C' .* numbers must be finite"),
        ({"param_grid": {f"{LOGREG}.C": ["[" * 100_000]}}, r"is not JSON"),
        ({"param_grid": {f"{LOGREG}.C": ["1" * 200_000]}}, r"is 200000 characters; at most 100000"),
        ({"params": {LOGREG: '{"C": ' + "[" * 9 + "]" * 9 + "}"}}, r"nested more than 8 levels deep"),
        (
            {"estimator_spec": "sklearn.preprocessing.FunctionTransformer"},
            r"is refused: .* calls the function",
        ),
    ],
)
def test_request_parameters_pass_the_estimator_checks(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(RequestRejectedError, match=reason):
        plan(**overrides)


def test_pipelines_without_labels_are_rejected() -> None:
    st = state(definition("phishing", label=pipelines.LabelFile(source="none")))
    with pytest.raises(RequestRejectedError, match="has no labels"):
        plan(st)


def test_a_classifier_for_a_regression_pipeline_is_rejected() -> None:
    st = state(definition("trump"))
    with pytest.raises(RequestRejectedError, match="is not a regressor, but pipeline 'trump'"):
        plan(st, pipeline="trump")
    assert plan(st, pipeline="trump", estimator_spec="sklearn.linear_model.Ridge").regression


def test_every_step_that_takes_random_state_gets_the_seed_unless_given() -> None:
    spec = "sklearn.preprocessing.StandardScaler | sklearn.ensemble.RandomForestClassifier"
    p = plan(estimator_spec=spec, seed=11)
    assert p.params == {"sklearn.ensemble.RandomForestClassifier": {"random_state": 11}}
    given = {"sklearn.ensemble.RandomForestClassifier": '{"random_state": 3, "n_estimators": 5}'}
    p = plan(estimator_spec=spec, seed=11, params=given)
    assert p.params == {"sklearn.ensemble.RandomForestClassifier": {"random_state": 3, "n_estimators": 5}}


def test_grid_order_is_scikit_learns_parameter_grid_order() -> None:
    steps = estimators.parse_spec(SCALED_LOGREG)
    grid = {
        f"{LOGREG}.C": ["0.1", "1.0", "10.0"],
        "sklearn.preprocessing.StandardScaler.with_mean": ["true", "false"],
        f"{LOGREG}.fit_intercept": ["true", "false"],
    }
    got = expand_grid(steps, grid)
    flat = {k: [json.loads(v) for v in vs] for k, vs in grid.items()}
    expected = [
        {step: {k.rpartition(".")[2]: v for k, v in combo.items() if k.rpartition(".")[0] == step}
         for step in (LOGREG, "sklearn.preprocessing.StandardScaler")}
        for combo in ParameterGrid(flat)
    ]  # fmt: skip
    assert got == expected and len(got) == 12
    assert expand_grid(estimators.parse_spec(LOGREG), {"C": ["1", "2"]}) == [
        {LOGREG: {"C": 1}},
        {LOGREG: {"C": 2}},
    ]
    assert expand_grid(steps, {}) == [{}]


# -- ranges ----------------------------------------------------------------------------------------------
MARKS = {(FEATURES, 0): (100, 1000), (FEATURES, 1): (0, 500), (LABELS, 0): (0, 50)}


def rng(start: int, end: int, partition: int = 0, topic: str = FEATURES) -> dict[str, Any]:
    return {"topic": topic, "partition": partition, "start_offset": start, "end_offset": end}


@pytest.mark.parametrize(
    ("ranges", "reason"),
    [
        ([rng(200, 200)], r"empty range t.phishing.features\[0\] offsets \[200, 200\)"),
        ([rng(300, 200)], "start_offset must be below end_offset"),
        ([rng(900, 1001)], r"goes beyond the end of the partition: its next offset is 1000"),
        ([rng(0, 50)], r"offsets \[0, 50\) no longer exists: records before offset 100 were deleted"),
        ([rng(50, 150)], "no longer exists"),
        ([rng(0, 10, topic="t.other.features")], "comes from the pipeline's features topic"),
        ([rng(0, 10, topic=LABELS)], "comes from the pipeline's features topic"),
        ([rng(0, 10, partition=7)], "has no partition 7 \\(it has 2\\)"),
        ([rng(100, 300), rng(200, 400)], "ranges overlap"),
    ],
)
def test_bad_ranges_are_rejected_with_a_reason(ranges: list[dict[str, Any]], reason: str) -> None:
    with pytest.raises(RequestRejectedError, match=reason):
        check_ranges(ranges, FEATURES, None, MARKS)


def test_good_ranges_come_back_sorted_and_labels_ranges_only_for_topic_labels() -> None:
    ranges = [rng(0, 500, partition=1), rng(400, 1000), rng(100, 400)]
    assert check_ranges(ranges, FEATURES, None, MARKS) == [rng(100, 400), rng(400, 1000), rng(0, 500, 1)]
    with_labels = check_ranges([rng(0, 50, topic=LABELS), rng(100, 200)], FEATURES, LABELS, MARKS)
    assert with_labels == [rng(100, 200), rng(0, 50, topic=LABELS)]
    with pytest.raises(RequestRejectedError, match="no range on the features topic"):
        check_ranges([rng(0, 50, topic=LABELS)], FEATURES, LABELS, MARKS)


# -- the dataset -----------------------------------------------------------------------------------------
def test_assemble_uses_inline_labels_once_per_event_and_counts_what_it_left_out() -> None:
    values = [
        fv_bytes("a", {"x": 1.0}, True),
        fv_bytes("b", {"x": 2.0}),  # no label
        fv_bytes("a", {"x": 9.0}, False),  # a duplicate (producer retry): the first one counts
        b"not avro",
        None,
        fv_bytes("c", {"x": 3.0}, False, pipeline="other"),
        fv_bytes("d", {"x": 4.0, "colour": "red"}, False),
    ]
    data = assemble(values, None, pipeline="phishing")
    assert data.features == [{"x": 1.0}, {"x": 4.0, "colour": "red"}]
    assert data.labels == [True, False]
    assert (data.read, data.unlabelled, data.duplicates, data.undecodable) == (7, 1, 1, 3)


def test_assemble_leaves_out_events_that_happened_before_event_time_from() -> None:
    """A drift's retraining: a partition that lagged behind holds old-concept events after its offset."""
    values = [fv_bytes(f"e{t}", {"x": float(t)}, t % 2 == 0, event_time=t) for t in (50, 100, 20, 150, 99)]
    data = assemble(values, None, pipeline="phishing", event_time_from=100)
    assert data.features == [{"x": 100.0}, {"x": 150.0}] and data.earlier == 3
    assert assemble(values, None, pipeline="phishing").earlier == 0
    with pytest.raises(
        RequestRejectedError, match="5 feature vectors read, 5 of them before event_time_from"
    ):
        check_dataset(
            assemble(values, None, pipeline="phishing", event_time_from=10**6), False, 0.2, "inline"
        )


def test_assemble_joins_labels_from_the_labels_topic_by_event_id() -> None:
    codec = codec_for("Label")
    labels = label_map(
        [codec.encode({"event_id": e, "pipeline": "phishing", "label": y, "label_time": 0})
         for e, y in (("a", 1), ("b", 0), ("a", 2))] + [b"junk"]
    )  # fmt: skip
    assert labels == {"a": 2, "b": 0}  # the later label of an event replaces the earlier one
    data = assemble(
        [fv_bytes("a", {"x": 1.0}, 7), fv_bytes("b", {"x": 2.0}), fv_bytes("z", {"x": 3.0})],
        labels,
        pipeline="phishing",
    )
    assert data.labels == [2, 0] and data.unlabelled == 1  # the inline label 7 is not used


@pytest.mark.parametrize(
    ("labels", "regression", "reason"),
    [
        ([], False, "no labelled records in the slice: 3 feature vectors read"),
        ([True] * 40, False, r"one class only \(True in 40 labelled records\)"),
        ([1.0, "high", 2.0], True, "label 'high' is not a number"),
        ([True, False, True], False, r"too few labelled records \(3\)"),
    ],
)
def test_datasets_that_cannot_be_trained_are_rejected(
    labels: list[Any], regression: bool, reason: str
) -> None:
    data = Dataset(features=[{"x": float(i)} for i in range(len(labels))], labels=labels, read=3)
    with pytest.raises(RequestRejectedError, match=reason):
        check_dataset(data, regression, 0.5, "inline label")


# -- vectorizing and splitting ---------------------------------------------------------------------------
def test_vectorizing_does_not_depend_on_key_order_and_one_hot_encodes_strings() -> None:
    rows = [{"b": 1.0, "a": 2.0, "colour": "red"}, {"colour": "blue", "a": 0.5, "b": 3.0}]
    shuffled = [dict(reversed(list(r.items()))) for r in rows]
    v1, v2 = DictVectorizer(sort=True, sparse=False), DictVectorizer(sort=True, sparse=False)
    assert np.array_equal(v1.fit_transform(rows), v2.fit_transform(shuffled))
    assert list(v1.feature_names_) == ["a", "b", "colour=blue", "colour=red"]


def test_split_is_seeded_stratified_and_sized_like_the_request() -> None:
    labels = [y for _, y in PHISHING]
    train_a, hold_a = split_indices(labels, 0.2, seed=1, classification=True)
    train_b, hold_b = split_indices(labels, 0.2, seed=1, classification=True)
    _, hold_c = split_indices(labels, 0.2, seed=2, classification=True)
    assert (train_a, hold_a) == (train_b, hold_b) and hold_a != hold_c
    assert len(hold_a) == 250 and sorted(train_a + hold_a) == list(range(1250))
    share = sum(labels) / len(labels)
    assert abs(sum(labels[i] for i in hold_a) / len(hold_a) - share) < 0.005  # stratified


# -- training --------------------------------------------------------------------------------------------
def test_adapter_predictions_equal_the_sklearn_models_with_the_original_label_values() -> None:
    outcome = train(plan(estimator_spec=SCALED_LOGREG), phishing_data())
    model = outcome.model
    xs = [x for x, _ in PHISHING[:200]]
    expected = model.estimator.predict_proba(DictVectorizer(sort=True, sparse=False).fit(xs).transform(xs))
    for x, row in zip(xs, expected, strict=True):
        proba = model.predict_proba_one(x)
        assert set(proba) == {False, True} and all(type(k) is bool for k in proba)
        assert proba == {False: pytest.approx(row[0], rel=1e-12), True: pytest.approx(row[1], rel=1e-12)}
        assert model.predict_one(x) is max(proba, key=proba.__getitem__)
    assert outcome.metrics["accuracy"] > 0.85 and 0.9 < outcome.metrics["roc_auc"] <= 1.0
    assert outcome.metrics["log_loss"] > 0
    assert (outcome.train_records, outcome.holdout_records) == (1000, 250)
    clone = pickle.loads(pickle.dumps(model))  # what the predictor unpickles
    assert [clone.predict_proba_one(x) for x in xs] == [model.predict_proba_one(x) for x in xs]


def test_integer_labels_come_back_as_python_ints() -> None:
    data = Dataset(
        features=[{"a": float(i % 7), "b": float(i % 3)} for i in range(300)],
        labels=[int(i % 7 > 3) for i in range(300)],
    )
    model = train(plan(estimator_spec="sklearn.tree.DecisionTreeClassifier"), data).model
    assert model.predict_proba_one({"a": 6.0, "b": 0.0}) == {0: 0.0, 1: 1.0}
    assert type(model.predict_one({"a": 1.0, "b": 0.0})) is int


def test_grid_keeps_the_best_candidate_and_the_first_on_ties() -> None:
    grid = {f"{LOGREG}.C": ["1e-06", "1.0"]}
    outcome = train(plan(estimator_spec=SCALED_LOGREG, param_grid=grid), phishing_data())
    assert outcome.chosen == 1 and outcome.params[LOGREG]["C"] == 1.0
    assert outcome.candidates[0]["accuracy"] < outcome.candidates[1]["accuracy"]
    assert outcome.metrics["accuracy"] == outcome.candidates[1]["accuracy"]

    tree = "sklearn.tree.DecisionTreeClassifier"  # depths 40 and 50 grow the same full tree
    outcome = train(
        plan(estimator_spec=tree, param_grid={f"{tree}.max_depth": ["50", "40"]}), phishing_data()
    )
    assert outcome.candidates[0] == outcome.candidates[1]
    assert outcome.chosen == 0 and outcome.params[tree] == {"max_depth": 50, "random_state": 7}


def test_replaying_a_request_reproduces_the_model_and_a_new_seed_does_not() -> None:
    spec = "sklearn.ensemble.RandomForestClassifier"
    p = plan(estimator_spec=spec, params={spec: '{"n_estimators": 20, "max_features": 2}'}, seed=3)
    first, again = train(p, phishing_data()), train(p, phishing_data())
    xs = [x for x, _ in PHISHING[::10]]
    assert first.metrics == again.metrics
    assert [first.model.predict_proba_one(x) for x in xs] == [again.model.predict_proba_one(x) for x in xs]
    other = train(plan(estimator_spec=spec, params={spec: '{"n_estimators": 20, "max_features": 2}'}, seed=4),
                  phishing_data())  # fmt: skip
    assert [first.model.predict_proba_one(x) for x in xs] != [other.model.predict_proba_one(x) for x in xs]


def test_regression_reports_mae_and_rmse_and_predicts_floats() -> None:
    rows = list(datasets.TrumpApproval())
    data = Dataset(features=[dict(x) for x, _ in rows], labels=[y for _, y in rows])
    ridge = plan(state(definition("trump")), pipeline="trump", estimator_spec="sklearn.linear_model.Ridge")
    outcome = train(ridge, data)
    assert set(outcome.metrics) == {"mae", "rmse", "train_records", "holdout_records"}
    assert 0 < outcome.metrics["mae"] <= outcome.metrics["rmse"] < 5
    y = outcome.model.predict_one(rows[0][0])
    assert type(y) is float and abs(y - rows[0][1]) < 5
    assert outcome.model.predict_proba_one(rows[0][0]) == {}


def test_estimators_without_probabilities_put_all_mass_on_the_prediction() -> None:
    model = train(plan(estimator_spec="sklearn.svm.LinearSVC"), phishing_data()).model
    x = PHISHING[0][0]
    assert model.predict_proba_one(x) == {model.predict_one(x): 1.0}


def test_a_fit_that_raises_is_a_training_failure_with_the_reason() -> None:
    params = {LOGREG: '{"solver": "lbfgs", "l1_ratio": 1.0, "C": -1}'}
    with pytest.raises(TrainingFailedError, match=f"fitting {LOGREG} failed: .*C"):
        train(plan(params=params), phishing_data(200))


# -- records ---------------------------------------------------------------------------------------------
def test_version_record_is_signed_with_full_lineage_and_fits_the_schemas() -> None:
    st = state()
    st.on_promotion({"pipeline": "phishing", "action": "PROMOTE", "version": 12})
    grid = {f"{LOGREG}.C": ["0.01", "1.0"]}
    p = plan(st, estimator_spec=SCALED_LOGREG, param_grid=grid)
    outcome = train(p, phishing_data())
    ranges = [rng(0, 1250)]
    record = version_record(p, outcome, version=3, training_data=ranges, signing_key=KEY, now_ms=123)
    assert codec_for("ModelVersion").decode(codec_for("ModelVersion").encode(record)) == record
    assert (record["kind"], record["version"], record["model_name"], record["parent_version"]) == (
        "BATCH", 3, "batch", 12,
    )  # fmt: skip
    assert record["training_data"] == ranges and record["events_seen"] == 1000
    assert json.loads(record["params"][LOGREG]) == {"C": 1.0, "random_state": 7}  # chosen + seed
    assert record["metrics"]["holdout_records"] == 250 and "accuracy" in record["metrics"]
    assert {"python", "scikit-learn", "numpy"} <= set(record["library_versions"])
    loaded = artifacts.load(record, KEY)["model"]
    assert isinstance(loaded, BatchModel)
    assert loaded.predict_proba_one(PHISHING[5][0]) == outcome.model.predict_proba_one(PHISHING[5][0])
    with pytest.raises(artifacts.ArtifactRejectedError, match="bad signature"):
        artifacts.load(record, b"another-key")

    ok = result_record(request(), "SUCCEEDED", now_ms=5, duration_ms=40, version=3, outcome=outcome)
    rejected = result_record(request(), "REJECTED", now_ms=5, duration_ms=1, reason="empty range")
    codec = codec_for("TrainingResult")
    assert codec.decode(codec.encode(ok))["train_records"] == 1000
    assert codec.decode(codec.encode(rejected)) == {
        "request_id": "r-1", "pipeline": "phishing", "model_name": "batch", "status": "REJECTED",
        "reason": "empty range", "model_version": None, "metrics": {}, "train_records": 0,
        "holdout_records": 0, "duration_ms": 1, "finished_at": 5,
    }  # fmt: skip
