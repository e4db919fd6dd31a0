"""The API server is real: schema validation with its own message, RBAC that says 403."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

Kubectl = Callable[..., subprocess.CompletedProcess[str]]

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.foundation.test}
spec:
  group: foundation.test
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
"""


def test_crd_schema_rejects_with_the_api_servers_message(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", "-", input=WIDGET_CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.foundation.test", "--timeout=30s")
    bad = "apiVersion: foundation.test/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {size: 0}\n"
    result = kubectl("apply", "-f", "-", input=bad, check=False)
    assert result.returncode != 0
    assert 'The Widget "bad" is invalid' in result.stderr
    assert "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1" in result.stderr
    good = bad.replace("bad", "good").replace("size: 0", "size: 3")
    kubectl("apply", "-f", "-", input=good)
    assert kubectl("get", "widget", "good", "-o", "jsonpath={.spec.size}").stdout == "3"


def test_service_account_without_rbac_gets_403(control_plane: ControlPlane) -> None:
    config = control_plane.service_account_kubeconfig("foundation", "nobody")
    result = control_plane.kubectl("get", "pods", "-n", "foundation", kubeconfig=config, check=False)
    assert result.returncode != 0
    assert "(Forbidden)" in result.stderr
    assert 'User "system:serviceaccount:foundation:nobody" cannot list resource "pods"' in result.stderr
    assert control_plane.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                                 kubeconfig=config).stdout == "system:serviceaccount:foundation:nobody"
