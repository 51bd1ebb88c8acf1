"""A client of the Kubeflow Pipelines API at `--host`, with the credentials found, and errors
that say what failed and what to check. Used by `megasft pipeline submit`.

Authentication (first match wins: `KFP_TOKEN`, the projected token in
`KF_PIPELINES_SA_TOKEN_PATH`, none) is described in docs/pipeline.md, "Submitting to Kubeflow".
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megasft.errors import ConfigError, MegasftError

TOKEN_VARIABLE = "KFP_TOKEN"
SA_TOKEN_PATH_VARIABLE = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client's own name for it
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
REQUEST_TIMEOUT_S = 15.0


def normalized_host(host: str) -> str:
    """The KFP API's URL as given to `--host`, without surrounding blanks or a trailing slash.

    Args:
        host: the URL given.

    Returns:
        The URL, normalized.

    Raises:
        ConfigError: the URL has no http:// or https:// scheme.
    """
    host = host.strip().rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise ConfigError(
            f"--host {host!r}: give the KFP API's URL with its scheme, e.g. "
            "https://kubeflow.example.com/pipeline or http://localhost:8888"
        )
    return host


def _bearer_token() -> tuple[str | None, str]:
    """The token to send and where it came from (for messages); (None, ...) for none."""
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        return token, f"${TOKEN_VARIABLE}"
    path = os.environ.get(SA_TOKEN_PATH_VARIABLE) or DEFAULT_SA_TOKEN_PATH
    if os.path.isfile(path):
        try:
            return Path(path).read_text().strip(), path
        except OSError as error:
            raise MegasftError(f"cannot read the KFP token file {path}: {error}") from error
    return None, "no credentials"


def check_endpoint(host: str) -> None:
    """One quick GET of the health endpoint, for a clear error instead of kfp's retries.

    Args:
        host: the KFP API's URL.

    Raises:
        MegasftError: the endpoint is unreachable, refuses the credentials, is no KFP API,
            or answers with a web page (a login page).
    """
    token, source = _bearer_token()
    url = f"{host}/apis/v2beta1/healthz"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    hint_auth = (
        f"set {TOKEN_VARIABLE} to a token the endpoint accepts"
        if token is None
        else f"the token from {source} was refused; check it and its audience"
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            body = response.read()
            final_url = response.geturl()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise MegasftError(
                f"KFP at {host}: not authorized (HTTP {error.code}); {hint_auth}"
            ) from error
        if error.code == 404:
            raise MegasftError(
                f"KFP at {host}: no KFP API there ({url} answered 404); give the URL the API "
                "is served at, e.g. https://kubeflow.example.com/pipeline"
            ) from error
        raise MegasftError(f"KFP at {host}: {url} answered HTTP {error.code}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise MegasftError(f"cannot reach KFP at {host}: {reason}") from error
    try:
        json.loads(body)
    except ValueError as error:
        # An ingress that wants a login answers with its sign-in page, after redirects.
        raise MegasftError(
            f"KFP at {host}: {url} answered with a web page from {final_url}, not the KFP API "
            f"(a login page?); {hint_auth}"
        ) from error


def connect(host: str, namespace: str | None) -> Any:
    """A kfp.Client for `host` with the credentials found (`KFP_TOKEN`, the projected token).

    Args:
        host: the KFP API's URL.
        namespace: the Kubeflow profile namespace (None for single-user KFP).

    Returns:
        The client.

    Raises:
        MegasftError: the token file cannot be read, or the client cannot connect.
    """
    import kfp

    options: dict[str, Any] = {"host": host}
    if namespace:
        options["namespace"] = namespace
    token, source = _bearer_token()
    if source == f"${TOKEN_VARIABLE}":
        options["existing_token"] = token
    elif token is not None:
        options["credentials"] = kfp.client.ServiceAccountTokenVolumeCredentials(path=source)
    with warnings.catch_warnings(), api_errors(host, "connecting"):
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")
        return quietly(kfp.Client, **options)


@contextlib.contextmanager
def api_errors(host: str, action: str) -> Iterator[None]:
    """KFP API failures as MegasftErrors that say what failed and what to check.

    Args:
        host: the KFP API's URL (named in the message).
        action: what was being done ("creating the run").

    Raises:
        MegasftError: the API call inside the block failed.
    """
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as error:
        detail = _api_error_message(error)
        hint = ""
        if error.status in (401, 403):
            hint = (
                "; check the token (KFP_TOKEN or the ServiceAccount token) and that its identity "
                "may use pipelines, experiments and runs"
                + (" in that namespace (--namespace)" if error.status == 403 else "")
            )
        raise MegasftError(
            f"KFP at {host}: {action} failed: HTTP {error.status} {detail}{hint}"
        ) from error
    except urllib3.exceptions.HTTPError as error:
        raise MegasftError(f"KFP at {host}: {action} failed: {error}") from error
    except (TimeoutError, ValueError) as error:  # kfp's healthz retries; its name checks
        raise MegasftError(f"KFP at {host}: {action} failed: {error}") from error


def _api_error_message(error: Any) -> str:
    try:
        body = json.loads(error.body or "")
        return str(body.get("message") or body.get("error") or error.reason)
    except (ValueError, AttributeError):
        return str(error.reason or "")


def quietly(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call kfp, sending what it prints ("Run details: ...") to stderr: stdout is ours.

    Args:
        function: the kfp call.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        What `function` returns.
    """
    with contextlib.redirect_stdout(sys.stderr):
        return function(*args, **kwargs)
