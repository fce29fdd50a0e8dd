"""`sigmavae_jax.load("owner/name")`: VAEs from the Hugging Face Hub, converted once and cached.

    codec = sigmavae_jax.load("stabilityai/sdxl-vae")
    codec = sigmavae_jax.load("black-forest-labs/FLUX.1-dev", subfolder="vae")  # gated: log in first
    codec = sigmavae_jax.load("stepfun-ai/NextStep-1-f8ch16-Tokenizer")        # checkpoint.pt: torch, once
    codec = sigmavae_jax.load("out/flux")                                       # a local params export

A name is a local path, or a Hub name `owner/name[/subfolder][@revision]` (the keyword arguments
`subfolder=` and `revision=` say the same). Files come through huggingface_hub, so its cache,
HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT and your token (`hf auth login` or HF_TOKEN)
apply. Only the VAE files are fetched (config.json + one weights file, safetensors preferred);
a pipeline repo (model_index.json) without weights at its root is read from its vae/ folder.

The weights are converted once, by the converter (`sigmavae-convert`) in a child process on
the CPU, so torch is never imported here and a converter on a pod host never joins the
host's distributed JAX. The export is cached under

    $SIGMAVAE_CACHE (default ~/.cache/sigmavae_jax) / hub / <owner>--<name> / <subfolder or _root> / <commit>

written to a temporary folder beside it and renamed into place, so an interrupted conversion
never leaves a half export. Later loads of the same commit read that export: no torch, and with
HF_HUB_OFFLINE=1 (or no network) no network either; a new commit of the revision converts anew.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from sigmavae_jax import api, storage
from sigmavae_jax.checkpoint import is_params_export

# The converter's folder rules: its weight files in order of preference (diffusers folders,
# then NextStep-1's checkpoint.pt), so what is fetched is what it reads.
from sigmavae_jax.convert.readers import FOLDER_WEIGHTS, SAFETENSORS_SUFFIXES, SIDE_CONFIG, TORCH_SUFFIXES

log = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"
PIPELINE_VAE = "vae"
NAME_FORMAT = "owner/name[/subfolder][@revision]"
LOGIN = "`hf auth login` (or set HF_TOKEN)"


class HubError(FileNotFoundError):
    """A Hub name that could not be turned into a local params export; the message says why
    and what to do, in one line where the cause is the Hub (repo, access, network)."""


# ---------------------------------------------------------------------------------------
# Names.


def parse_name(name: str) -> tuple[str, str | None, str | None] | None:
    """`owner/name[/subfolder][@revision]` -> (repo id, subfolder, revision), or None when
    `name` is not of that form (huggingface_hub's repo id rules)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name or name[0] in "/.~" or "\\" in name or "://" in name:
        return None
    revision = None
    if "@" in name:
        name, revision = name.rsplit("@", 1)
        if not revision:
            return None
    parts = name.split("/")
    if len(parts) < 2 or not all(parts):
        return None
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, "/".join(parts[2:]) or None, revision


def is_hub_name(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` is no existing local path but reads as a Hub name."""
    return (
        isinstance(name_or_path, str)
        and not storage.is_remote(name_or_path)
        and not pathlib.Path(name_or_path).expanduser().exists()
        and parse_name(name_or_path) is not None
    )


def cache_root() -> pathlib.Path:
    """Where converted Hub exports live: $SIGMAVAE_CACHE, else ~/.cache/sigmavae_jax."""
    root = os.environ.get("SIGMAVAE_CACHE")
    if root:
        return pathlib.Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "sigmavae_jax"


def cache_path(repo_id: str, subfolder: str | None, commit: str) -> pathlib.Path:
    """The params export of `repo_id`/`subfolder` at `commit` (whether or not it exists yet)."""
    sub = subfolder.strip("/").replace("/", "--") if subfolder else "_root"
    return cache_root() / "hub" / repo_id.replace("/", "--") / sub / commit


# ---------------------------------------------------------------------------------------
# The Hub (every call to huggingface_hub goes through these, so tests can stand in for it).


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _remote_listing(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """(commit hash, every file path of the repo at that commit), asked of the Hub."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision)
    return info.sha, [s.rfilename for s in info.siblings or []]


def _cached_snapshot(repo_id: str, revision: str | None) -> pathlib.Path:
    """The snapshot folder of `revision` in the local Hub cache (its name is the commit hash)."""
    from huggingface_hub import snapshot_download

    # allow_patterns=[]: resolve the revision only; which files are there is checked below
    return pathlib.Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[]))


def _download(repo_id: str, commit: str, files: list[str]) -> pathlib.Path:
    """Fetches `files` of `repo_id` at `commit` into the Hub cache; the snapshot folder."""
    from huggingface_hub import snapshot_download

    return pathlib.Path(snapshot_download(repo_id, revision=commit, allow_patterns=files))


def _has_token() -> bool:
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover - older huggingface_hub
        return True
    return get_token() is not None


def _hub_error(error: Exception, repo_id: str, revision: str | None, name: str) -> HubError:
    """huggingface_hub's exception as one line that says what to do."""
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        what = "log in with " + LOGIN if not _has_token() else "your token has no access yet"
        return HubError(
            f"{repo_id} is a gated repo: accept its terms at https://huggingface.co/{repo_id} "
            f"with your Hugging Face account, then {what}"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return HubError(
            f"{name}: no such local file or folder, and no Hugging Face repo {repo_id} "
            f"(check the spelling; for a private repo log in with {LOGIN})"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {revision!r}: use one of its branches, tags or commit hashes")
    if isinstance(error, errors.DisabledRepoError):
        return HubError(f"{repo_id} has been disabled on the Hugging Face Hub; pick another repo")
    if isinstance(error, errors.LocalEntryNotFoundError) and _offline():
        return HubError(
            f"{name} is neither a local path nor in the local Hugging Face cache ({_hub_cache()}), and "
            "HF_HUB_OFFLINE=1 forbids downloading it: run once with network access, or unset HF_HUB_OFFLINE"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return HubError(
            f"{name} is not a local path, the Hugging Face Hub cannot be reached, and {repo_id}{_at(revision)} "
            f"is not in the local cache ({_hub_cache()}): check the network connection (proxy, HF_ENDPOINT) and retry"
        )
    if isinstance(error, errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return HubError(
                f"the Hugging Face Hub refused access to {repo_id} (401): log in with {LOGIN}, "
                "or check that your token is valid"
            )
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return HubError(f"the Hugging Face Hub failed for {repo_id}: {first}; retry later")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return HubError(
        f"{name} is not a local path, the Hugging Face Hub cannot be reached ({type(error).__name__}: {first}), "
        f"and {repo_id}{_at(revision)} is not in the local cache ({_hub_cache()}): check the network connection "
        "(proxy, HF_ENDPOINT) and retry"
    )


def _at(revision: str | None) -> str:
    return f"@{revision}" if revision else ""


def _is_network_failure(error: Exception) -> bool:
    """A failure to reach the Hub (no connection, timeout, proxy, server error), as opposed
    to an answer from it (no such repo, gated, no such revision)."""
    from huggingface_hub import errors

    if isinstance(error, errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return isinstance(status, int) and status >= 500
    return not isinstance(error, (ValueError, TypeError, KeyError, AttributeError))


def _locate(repo_id: str, revision: str | None, name: str) -> tuple[str, list[str], pathlib.Path | None]:
    """(commit, repo file paths, local snapshot folder or None): from the Hub when it can be
    reached, else from the local Hub cache (then the files are the ones cached)."""
    unreachable: Exception | None = None
    if not _offline():
        try:
            commit, files = _remote_listing(repo_id, revision)
            return commit, files, None
        except Exception as error:  # noqa: BLE001 - sorted out right here
            if not _is_network_failure(error):
                raise _hub_error(error, repo_id, revision, name) from None
            unreachable = error
            log.warning("the Hugging Face Hub cannot be reached (%s); trying the local cache", type(error).__name__)
    try:
        snapshot = _cached_snapshot(repo_id, revision)
    except Exception as error:  # noqa: BLE001
        if unreachable is not None and not _offline():
            raise _hub_error(unreachable, repo_id, revision, name) from None
        raise _hub_error(error, repo_id, revision, name) from None
    if not snapshot.is_dir():
        raise _hub_error(_local_entry_error(), repo_id, revision, name) from None
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return snapshot.name, files, snapshot


def _local_entry_error() -> Exception:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("snapshot folder missing")


# ---------------------------------------------------------------------------------------
# Which files.


def _children(files: list[str], subfolder: str | None) -> dict[str, str]:
    """The files directly inside `subfolder` (the root for None): name -> repo path."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    out = {}
    for path in files:
        if path.startswith(prefix) and "/" not in path[len(prefix) :]:
            out[path[len(prefix) :]] = path
    return out


def _pick_files(files: list[str], subfolder: str | None, where: str) -> list[str]:
    """The repo paths to fetch: the weights file first, then its config.json if there is
    one. Raises HubError when the folder holds no VAE weights."""
    children = _children(files, subfolder)
    if (
        subfolder is None
        and not any(name in children for name in FOLDER_WEIGHTS)
        and PIPELINE_INDEX in children
        and _children(files, PIPELINE_VAE)
    ):
        log.info("%s is a pipeline repo; reading its %s/ folder", where, PIPELINE_VAE)
        return _pick_files(files, PIPELINE_VAE, f"{where}/{PIPELINE_VAE}")
    weights = next((children[name] for name in FOLDER_WEIGHTS if name in children), None)
    if weights is None:
        for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
            candidates = sorted(p for n, p in children.items() if n.lower().endswith(suffixes))
            if len(candidates) == 1:
                weights = candidates[0]
                break
            if len(candidates) > 1:
                raise HubError(
                    f"{where} holds several weight files ({', '.join(candidates)}); download the one "
                    "you want and convert it with sigmavae-convert (convert_torch_weights.py)"
                )
    if weights is None:
        prefix = f"{subfolder}/" if subfolder else ""
        subdirs = sorted(
            {p[len(prefix) :].split("/")[0] for p in files if p.startswith(prefix) and "/" in p[len(prefix) :]}
        )
        hint = f"; its folders: {', '.join(subdirs)} (name one as subfolder=, or {where}/FOLDER)" if subdirs else ""
        raise HubError(
            f"{where} holds no VAE weights (expected {SIDE_CONFIG} + diffusion_pytorch_model.safetensors, "
            f"or {SIDE_CONFIG} + checkpoint.pt, or one .safetensors/.ckpt/.pt file){hint}"
        )
    wanted = [weights]
    name = weights.rsplit("/", 1)[-1]
    if name in FOLDER_WEIGHTS and SIDE_CONFIG in children:
        wanted.append(children[SIDE_CONFIG])
    return wanted


# ---------------------------------------------------------------------------------------
# Conversion.


def _convert(src: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Converts the weights file `src` into the params export `out` with the converter's
    command line in a child process on the CPU; returns its warnings. Raises HubError."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "sigmavae_jax.cli.convert", str(src), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = done.stderr.splitlines()
    if done.returncode != 0:
        errors = [line for line in lines if line.startswith("error: ")]
        detail = "\n".join(lines[lines.index(errors[0]) :])[len("error: ") :] if errors else "\n".join(lines[-20:])
        raise HubError(f"converting {src} failed: {detail}")
    return [line[len("warning: ") :] for line in lines if line.startswith("warning: ")]


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> pathlib.Path:
    """Renames the finished export `tmp` to `final`; if another process got there first,
    keeps theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_params_export(final):
            raise
    return final


def resolve(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
) -> storage.Path:
    """A local or gs:// path as it is; a Hub name (an `owner/name[/subfolder][@revision]` that is no
    local path) as the path of its converted params export, fetched and converted on first
    use (see the module docstring). Raises TypeError unless `name_or_path` is a str or
    os.PathLike, HubError (a FileNotFoundError) whose message says what to do."""
    api.check_path_type(
        name_or_path,
        "a params export path (str or os.PathLike, local or gs://bucket/...) "
        f"or a Hugging Face Hub name ({NAME_FORMAT})",
    )
    if storage.is_remote(name_or_path):  # gs://... is read where it lies
        if subfolder is not None or revision is not None:
            raise ValueError(
                f"{name_or_path} is not a Hugging Face Hub name; subfolder= and revision= only apply to Hub names"
            )
        return storage.path(name_or_path)
    path = pathlib.Path(name_or_path).expanduser()
    parsed = parse_name(name_or_path) if isinstance(name_or_path, str) and not path.exists() else None
    if parsed is None:  # a local path (whoever reads it says if it is missing)
        if subfolder is not None or revision is not None:
            raise ValueError(
                f"{name_or_path} is not a Hugging Face Hub name ({NAME_FORMAT}); "
                "subfolder= and revision= only apply to Hub names"
            )
        return path
    repo_id, name_sub, name_rev = parsed
    for given, in_name, what in ((subfolder, name_sub, "subfolder"), (revision, name_rev, "revision")):
        if given is not None and in_name is not None and given != in_name:
            raise ValueError(f"{name_or_path} names {what} {in_name!r} but {what}={given!r} was given; give it once")
    subfolder = (subfolder if subfolder is not None else name_sub) or None
    subfolder = subfolder.strip("/") if subfolder else None
    revision = revision if revision is not None else name_rev

    commit, files, snapshot = _locate(repo_id, revision, str(name_or_path))
    final = cache_path(repo_id, subfolder, commit)
    if is_params_export(final):
        return final
    where = f"{repo_id}{'/' + subfolder if subfolder else ''}@{commit[:12]}"
    wanted = _pick_files(files, subfolder, where)
    if snapshot is None:
        try:
            snapshot = _download(repo_id, commit, wanted)
        except Exception as error:  # noqa: BLE001 - mapped to one line
            raise _hub_error(error, repo_id, revision, str(name_or_path)) from None
    src = snapshot / wanted[0]
    if not src.is_file():
        raise HubError(f"{src} is missing from the Hugging Face cache; run again with network access")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{commit}.", dir=final.parent))
    tmp.rmdir()  # the converter writes a new folder
    log.info("converting %s (%s) once into %s", where, wanted[0], final)
    start = time.perf_counter()
    try:
        notes = _convert(src, tmp)
        info = {"repo_id": repo_id, "subfolder": subfolder, "revision": revision, "commit": commit, "files": wanted}
        (tmp / "hub.json").write_text(json.dumps(info, indent=2) + "\n")
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for note in notes:
        log.warning("%s: %s", where, note)
    log.info("converted %s in %.1f s", where, time.perf_counter() - start)
    return final


def load(
    name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    **codec_kwargs: Any,
) -> api.Codec:
    """A Codec from a local params export or a Hub name (`owner/name[/subfolder][@revision]`).

    subfolder, revision: of the Hub repo (e.g. subfolder="vae" of a FLUX repo; a branch, tag
    or commit hash). dtype and the other keyword arguments go to `sigmavae_jax.api.load`.
    Raises TypeError unless `name_or_path` is a str or os.PathLike (see `resolve` and
    `sigmavae_jax.api.load` for the rest).
    """
    return api.load(resolve(name_or_path, subfolder, revision), dtype=dtype, **codec_kwargs)
