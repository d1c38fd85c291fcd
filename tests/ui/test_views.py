"""The dashboard's pure parts: what a job's summary shows, the batch matrix layout, and the
session and CSRF tokens (tampering, expiry, binding)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from digin.api.dashboard import content_security_policy, number, views
from digin.api.dashboard.sessions import Signer
from digin.service.db import Job
from digin.service.repo.dashboard import BatchItem


def job(kind: str, summary: dict, status: str = "succeeded") -> Job:
    return Job(id=uuid.uuid4(), kind=kind, status=status, params={"classes": ["seven"]},
               result={"summary": summary, "artifacts": []},
               created_at=datetime.now(UTC))  # fmt: skip


def test_headline_of_each_kind():
    guided = {"metric_names": {"p": "p(class | x)"},
              "items": [{"best": {"clean_loss": 0.1, "p": 0.9}}, {"best": {"p": 0.7}}]}  # fmt: skip
    assert views.headline(job("guided", guided)) == [("p", pytest.approx(0.8))]
    assert views.headline(job("guided", guided, status="running")) == []
    cf = {"items": [{"flip": True, "after": {"p_target": 0.75}},
                    {"flip": False, "after": {"p_target": 0.25}}]}  # fmt: skip
    assert views.headline(job("counterfactual", cf)) == [("flips", "1/2"), ("p(target)", 0.5)]
    pca = {"pca": {"explained_variance_ratio": [0.94, 0.02]}}
    assert views.headline(job("neural_pca", pca)) == [("PC0 share", 0.94)]
    assert views.headline(job("spurious_score", {"mean_auc": 0.0})) == [("mean AUC", 0.0)]


def test_generative_items_read_best_metrics_and_the_trajectory():
    summary = {
        "metric_names": {"p": "p(class | x) of digits:cnn"},
        "items": [{"index": 1, "class_name": "three", "prompt": "a digit three",
                   "best_iteration": 1, "best": {"clean_loss": 0.2, "p": 0.8},
                   "clean_loss": [1.0, 0.2], "metrics": {"p": [0.3, 0.8]}}],
    }  # fmt: skip
    (item,) = views.generative_items(summary, ["item_001.png"])
    assert item.label == "three" and item.image == "item_001.png" and item.start is None
    assert [(m.name, m.value) for m in item.best] == [("p", 0.8), ("clean_loss", 0.2)]
    assert item.columns == ["clean_loss", "p"]
    assert item.trajectory == [[1.0, 0.3], [0.2, 0.8]]


def test_counterfactual_view_has_start_and_target_probabilities_before_and_after():
    item = {"index": 0, "target_name": "three", "flip": True,
            "before": {"p_start": 0.4, "p_target": 0.2},
            "after": {"p_start": 0.01, "p_target": 0.76, "prediction": 3}}  # fmt: skip
    summary = {"start_class": {"name": "five"}, "items": [item]}
    view = views.counterfactual_view(summary, ["item_000.png", "original.png", "mask.png"])
    (item,) = view["items"]
    assert view["start"] == "five" and view["figures"] == ["original.png", "mask.png"]
    assert item.probabilities == [("before", 0.4, 0.2), ("after", 0.01, 0.76)]
    assert item.image == "item_000.png" and item.prediction == 3


def test_batch_matrix_lays_out_classes_by_classifiers_and_pages_rows():
    items = []
    for m, model in enumerate(["digits:cnn", "digits:mlp"]):
        for c in range(5):
            for s in (0, 1):
                index = m * 10 + c * 2 + s
                items.append(BatchItem(uuid.uuid4(), index, f"c={c}|m={model}|s={s}", "queued"))
    matrix = views.batch_matrix(items, page=2, rows_per_page=2)
    assert matrix.columns == ["digits:cnn", "digits:mlp"]
    assert matrix.rows == ["2", "3"] and matrix.pages == 3 and matrix.total_rows == 5
    cell = matrix.cells[("3", "digits:mlp")]
    assert [i.custom_id for i in cell] == ["c=3|m=digits:mlp|s=0", "c=3|m=digits:mlp|s=1"]
    assert len(matrix.ids()) == 8
    assert views.batch_matrix(items, page=99, rows_per_page=2).page == 3
    names = {"digits:cnn": ("zero", "one", "two", "three")}.get
    assert views.class_label("3", "digits:cnn", names) == "3 · three"
    assert views.class_label("seven", "digits:cnn", names) == "seven"


def test_explicit_items_get_a_row_each():
    items = [BatchItem(uuid.uuid4(), i, f"my-item-{i}", "succeeded") for i in range(3)]
    matrix = views.batch_matrix(items, page=1, rows_per_page=10)
    assert not matrix.by_axes and matrix.columns == ["item"]
    assert matrix.rows == ["my-item-0", "my-item-1", "my-item-2"]


def test_session_tokens_are_signed_expire_and_bind_csrf():
    signer = Signer(b"k" * 32, lifetime_s=60)
    tenant = uuid.uuid4()
    cookie, token = signer.issue(key_prefix="0123abcd", tenant_id=tenant)
    read = signer.read(cookie)
    assert read == token and read.tenant_id == tenant and read.key_prefix == "0123abcd"
    body, signature = cookie.rsplit(".", 1)
    forged = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + signature
    assert signer.read(forged) is None
    assert Signer(b"x" * 32, 60).read(cookie) is None  # another server secret
    expired = Signer(b"k" * 32, lifetime_s=-1).issue(key_prefix=None, tenant_id=None)[0]
    assert signer.read(expired) is None
    assert signer.check_csrf(token, signer.csrf(token))
    other = signer.issue(key_prefix=None, tenant_id=None)[1]
    assert not signer.check_csrf(other, signer.csrf(token))
    assert not signer.check_csrf(None, signer.csrf(token)) and not signer.check_csrf(token, "")
    assert token.expires <= time.time() + 60


def test_csp_and_number_format():
    csp = content_security_policy(["'self'", "https://platform.example.org"])
    assert "frame-ancestors 'self' https://platform.example.org" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert number(0.123456) == "0.1235" and number(2e-9) == "2e-09" and number(None) == "–"


def test_dashboard_settings(tmp_path):
    from pydantic import ValidationError

    from digin.service.settings import fresh_settings

    s = fresh_settings(data_dir=tmp_path, frame_ancestors="self, https://platform.example.org")
    assert s.frame_ancestors == ["'self'", "https://platform.example.org"]
    assert fresh_settings(data_dir=tmp_path).frame_ancestors == ["'self'"]
    with pytest.raises(ValidationError, match="DIGIN_FRAME_ANCESTORS"):
        fresh_settings(data_dir=tmp_path, frame_ancestors="https://a.org; script-src *")
    with pytest.raises(ValidationError, match="'none' cannot be combined"):
        fresh_settings(data_dir=tmp_path, frame_ancestors="none,self")
    with pytest.raises(ValidationError, match="at least 32 characters"):
        fresh_settings(data_dir=tmp_path, secret_key="changethis")
