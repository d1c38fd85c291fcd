"""Probe class 5: model specs that name files and folders on the server.

The instance allows every spec (DIGIN_MODEL_ALLOW_LIST=*) and one model root holding a copy of
the digits zoo. The allow-list is about which models, not which paths: every path a spec would
read must lie inside the root (or the bundled zoo), as written ('..' collapsed) and with every
symbolic link resolved. Outside it, a spec is refused with one text, PATH_OUTSIDE_ROOTS, whether
the path exists or not, holds a model or not, or is a link; nothing read from there (the secret
zoo card's class names, /etc/passwd) reaches the answer. Each spec is sent in every model field
of jobs (classifier, diffusion, classifier1/2 of disagreement) and batches (classifiers axis,
classifier pairs, explicit items, the template's diffusion), with class names guessed from the
secret card. A spec inside the root is accepted (the control).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from digin.core.registry import PATH_OUTSIDE_ROOTS, parse_spec
from tests.adversarial.instance import Instance, Tally, brief, fields_of, is_problem

LEAKS = ["launch-code", "api-token", "zz-private", "root:", "No such file", "exist",
         "ermission", "not a directory", "Errno"]  # fmt: skip


def specs(layout: dict[str, Path]) -> list[str]:
    root, secret, folder = layout["root"], layout["secret"], layout["folder"]
    sibling = Path(f"{root}-evil")  # shares the root's name as a prefix
    if not sibling.exists():
        shutil.copytree(root / "zoo", sibling)
    classifiers = [
        f"digits:cnn@{secret}",  # exists, with a card
        f"digits:cnn@{folder}/no-such-folder",  # does not exist
        "digits:cnn@/etc",
        "digits:mlp@/etc/",
        f"digits:cnn@{root}/../secret",  # '..' escape
        f"digits:cnn@{root}/zoo/../../secret",
        f"digits:cnn@{root}/escape",  # a link out of the root
        f"digits:cnn@{root}/etc",  # a link to /etc
        f"digits:cnn@{sibling}",  # a real zoo next to the root
        "digits:cnn@../../../../etc",
        "digits:cnn@~",
        "digits:cnn@/proc/self/root/etc",
        "digits:judge@/",
        f"timm:resnet18@{secret}/w.safetensors",  # exists
        f"timm:resnet18@{secret}/none.safetensors",  # does not
        "timm:x@/etc/passwd.safetensors",
        f"timm:x@{root}/../secret/w.safetensors",
        f"timm:x@{root}/escape/w.safetensors",
        "timm:x@../w.safetensors",
        f"open_clip:ViT-B-16/{secret}/w.safetensors",
        "open_clip:ViT-B-32//etc/passwd.pt",
    ]
    diffusion = [
        "digits@/etc",
        f"digits@{secret}",
        f"digits@{root}/../secret",
        f"digits@{root}/escape",
        f"digits@{sibling}",
        "diffusers:/etc",
        "diffusers:/",
        "diffusers:/nonexistent/pipeline",
        f"diffusers:{root}/../..",
        f"diffusers:{root}/escape",
        "diffusers:./",
        "diffusers:../secret",
        "diffusers:~/.cache",
    ]
    assert all(parse_spec(s).kind == "classifier" for s in classifiers)
    assert all(parse_spec(s).kind == "diffusion" for s in diffusion)
    return classifiers + diffusion


def requests(spec: str) -> list[tuple[str, dict[str, Any], str]]:
    """(path, body, the field its problem must name) for every model field taking `spec`."""
    guess = ["launch-code"]
    if parse_spec(spec).kind == "diffusion":
        return [
            ("/v1/jobs", {"kind": "guided", "params": {"classes": [1], "diffusion": spec}},
             "params.diffusion"),
            ("/v1/jobs", {"kind": "neuron", "params": {"neurons": [1], "diffusion": spec}},
             "params.diffusion"),
            ("/v1/batches", {"kind": "guided", "classes": [1], "params_template":
                             {"diffusion": spec}}, "params_template.diffusion"),
            ("/v1/batches", {"kind": "guided", "items": [{"custom_id": "x", "params":
             {"classes": [1], "diffusion": spec}}]}, "items[0].params.diffusion"),
        ]  # fmt: skip
    return [
        ("/v1/jobs", {"kind": "guided", "params": {"classes": guess, "classifier": spec}},
         "params.classifier"),
        ("/v1/jobs", {"kind": "disagreement", "params": {"classes": [1], "classifier1": spec}},
         "params.classifier1"),
        ("/v1/jobs", {"kind": "disagreement", "params": {"classes": [1], "classifier2": spec}},
         "params.classifier2"),
        ("/v1/jobs", {"kind": "neural_pca", "params": {"class": 1, "classifier": spec}},
         "params.classifier"),
        ("/v1/batches", {"kind": "guided", "classes": guess, "classifiers": [spec]},
         "classifiers[0]"),
        ("/v1/batches", {"kind": "guided", "classes": "all", "classifiers": ["digits:cnn", spec]},
         "classifiers[1]"),
        ("/v1/batches", {"kind": "disagreement", "classes": [1],
                         "classifier_pairs": [["digits:cnn", spec]]}, "classifier_pairs[0]"),
        ("/v1/batches", {"kind": "guided", "items": [{"custom_id": "x", "params":
         {"classes": guess, "classifier": spec}}]}, "items[0].params.classifier"),
    ]  # fmt: skip


def test_paths_outside_the_model_root_are_refused_alike(instance: Instance, tally: Tally):
    probe = tally["5"]
    a = instance.tenants["adv-alpha"]
    layout = instance.fixtures["layout"]
    root = layout["root"]
    # Control: the same fields accept a zoo inside the root.
    inside = {"kind": "guided", "params": {"classes": [1], "classifier": f"digits:cnn@{root}/zoo",
              "diffusion": f"digits@{root}/zoo"}}  # fmt: skip
    control = instance.request("POST", "/v1/jobs", json=inside, headers=a.headers())
    assert control.status_code == 202, control.text

    details: dict[tuple[str, str], set[str]] = {}
    attempts: list[Callable[[], str | None]] = []
    for spec in specs(layout):
        for path, body, field in requests(spec):

            def attempt(spec: str = spec, path: str = path, body: dict[str, Any] = body,
                        field: str = field) -> str | None:  # fmt: skip
                response = instance.request("POST", path, json=body, headers=a.headers())
                errors = fields_of(response)
                leaked = [word for word in LEAKS if word in response.text]
                if not is_problem(response, 422) or leaked:
                    return f"{path} {field}={spec}: {brief(response)} {leaked}"
                if errors.get(field) != PATH_OUTSIDE_ROOTS or set(errors.values()) != {
                    PATH_OUTSIDE_ROOTS
                }:
                    return f"{path} {field}={spec}: {errors}"
                detail = response.json()["detail"].replace(spec, "<spec>")
                details.setdefault((path, field), set()).add(detail)
                return None

            attempts.append(attempt)
    failures = probe.run(attempts)
    # one text per route and field, whatever the spec (existing or missing, link or not)
    varied = {k: v for k, v in details.items() if len(v) > 1}
    probe.record(f"the answers differ: {varied}" if varied else None)
    assert not failures, failures[:10]
    assert not varied, varied
    assert probe.attempts > 200, probe.attempts
