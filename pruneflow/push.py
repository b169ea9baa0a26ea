"""``pruneflow-push RUN_DIR REPO_ID``: upload a run's ``model/`` (with its model card) to
the Hugging Face Hub, private by default.

    pruneflow-push outputs/2026-12-03/10-00-00 me/bert-base-sst2-seven-70 --dry-run
    pruneflow-push outputs/2026-12-03/10-00-00 me/bert-base-sst2-seven-70 --with-result
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pruneflow import hub
from pruneflow.errors import UserError


def files_to_upload(run_dir: Path, with_result: bool) -> list[tuple[Path, str]]:
    """(local file, path in the repository)."""
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").exists():
        raise UserError(f"{run_dir} has no model/ with a config.json: push needs a finished run that saved its model (save_model=true).")
    files = [(p, str(p.relative_to(model_dir))) for p in sorted(model_dir.rglob("*")) if p.is_file()]
    if with_result:
        for name in ("result.json", "predictions.jsonl"):
            if (run_dir / name).exists():
                files.append((run_dir / name, f"pruneflow/{name}"))
    return files


def ensure_card(run_dir: Path) -> None:
    """Older runs have no model card: write it from result.json."""
    card = run_dir / "model" / "README.md"
    result = run_dir / "result.json"
    if not card.exists() and result.exists():
        from pruneflow.card import model_card

        card.write_text(model_card(json.loads(result.read_text())))


def push(run_dir: Path, repo_id: str, private: bool = True, with_result: bool = False, dry_run: bool = False,
         commit_message: str | None = None) -> list[str]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"Invalid value for 'RUN_DIR': {run_dir} is not a directory (a pruneflow run's output folder).")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"Invalid value for 'REPO_ID': {repo_id!r}. Allowed: <user or organisation>/<name>, e.g. me/bert-base-sst2-seven-70.")
    if not dry_run:
        ensure_card(run_dir)
    files = files_to_upload(run_dir, with_result)
    lines = [f"{'would upload' if dry_run else 'uploading'} to https://huggingface.co/{repo_id} ({'private' if private else 'public'}):"]
    lines += [f"  {path_in_repo}  ({local.stat().st_size:,} bytes)" for local, path_in_repo in files]
    if dry_run:
        if not (run_dir / "model" / "README.md").exists():
            lines.append("  README.md  (the model card, written from result.json)")
        return lines
    if hub.is_offline(("HF_HUB_OFFLINE",)):
        raise UserError("Cannot reach the Hugging Face Hub: HF_HUB_OFFLINE is set. Unset it on a machine with network access, "
                        "or use --dry-run to list what would be uploaded.")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(local)) for local, p in files]
        api.create_commit(repo_id, operations=ops, commit_message=commit_message or f"pruneflow run {run_dir.name}", repo_type="model")
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all end here
        name = type(e).__name__
        if "Connection" in name or "Offline" in name or "Timeout" in name or "resolve" in str(e).lower():
            raise UserError(f"Cannot reach the Hugging Face Hub ({name}). Check the network, or use --dry-run to list what would be uploaded.") from e
        raise UserError(f"The upload to {repo_id} failed: {name}: {e}. Log in with `hf auth login` (or set HF_TOKEN) and check that you may write to it.") from e
    return [*lines, f"done: https://huggingface.co/{repo_id}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pruneflow-push", description="Upload a pruneflow run's model/ (and model card) to the Hugging Face Hub.")
    parser.add_argument("run_dir", type=Path, help="the run's output folder (it holds model/ and result.json)")
    parser.add_argument("repo_id", help="<user or organisation>/<name>")
    parser.add_argument("--public", action="store_true", help="create a public repository (default: private)")
    parser.add_argument("--with-result", action="store_true", help="also upload result.json and predictions.jsonl under pruneflow/")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    parser.add_argument("--message", default=None, help="commit message")
    args = parser.parse_args(argv)
    try:
        for line in push(args.run_dir, args.repo_id, private=not args.public, with_result=args.with_result, dry_run=args.dry_run, commit_message=args.message):
            print(line)
    except UserError as e:
        print(f"pruneflow-push: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
