"""``pruneflow``: the Hydra application that runs one job (or a sweep with ``-m``)."""

from __future__ import annotations

import difflib
import logging
import os
import re
import shlex
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import pruneflow
from pruneflow.config import local_process_launcher, register_configs
from pruneflow.console import guard_console, hub_logs_through_root
from pruneflow.errors import SPARSITY_ALLOWED, RunStopped, TrainingDiverged, UserError
from pruneflow.stop import STOPPED_FILE
from pruneflow.utils import unwritable

log = logging.getLogger("pruneflow")

# conf/ sits beside the package in the source tree (editable install).
CONFIG_DIR = str(pruneflow.CONFIG_DIR)
# The config groups a command line can choose (conf/<group>/); published/ holds data that
# experiments include, not a choice.
GROUPS = tuple(sorted(d.name for d in Path(CONFIG_DIR).iterdir() if d.is_dir() and d.name != "published"))
# Flags after which Hydra composes from elsewhere: the pre-check then leaves the errors to Hydra.
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--experimental-rerun")  # and --config-dir: _is_config_dir_flag
OTHER_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--info", "--help", "-h", "--hydra-help", "--shell-completion", "-sc")
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Hydra's modes: one per command (it raises a bare ValueError for two)
MODE_FLAGS = {"-m": "-m", "--multirun": "-m", "-r": "--run", "--run": "--run", "-c": "--cfg", "--cfg": "--cfg",
              "-i": "--info", "--info": "--info", "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def _report_error(message: str, label: str = "error") -> None:
    print("\n" + textwrap.fill(f"pruneflow: {label}: {message}", width=100, break_long_words=False, break_on_hyphens=False) + "\n", file=sys.stderr)


def folder_hint(key: str, folder: str | Path, overrides: list[str]) -> str:
    """Said after "run the same command again": the default output folder is a new one for
    every command (outputs/<day>/<time>), so the same command resumes only with its folder
    named; nothing when the command already names it."""
    if any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides):
        return ""
    return (f" The same command means with {key}={shlex.quote(str(Path(folder).absolute()))} added: without it, the command starts over in a "
            "new folder.")


def typed_hydra_overrides() -> list[str]:
    """The launching command's own ``hydra.*`` overrides (before Hydra runs)."""
    return [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~").startswith("hydra.")]


# ----------------------------------------------------------------------------- Hydra's errors, explained
def _options(group: str, config_dir: str | None = None) -> list[str]:
    """The options of a config group: the shipped ones and those of --config-dir's folder."""
    found = set()
    for base in (CONFIG_DIR, config_dir):
        root = Path(base) / group if base is not None else None
        if root is not None and root.is_dir():
            found |= {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")}
    return sorted(found)


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" Closest: {', '.join(close)}." if close else ""


def _keys_at(cfg: Any, path: str) -> list[str]:  # noqa: ANN401
    node = cfg
    for part in [p for p in path.split(".") if p]:
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return []
    return [str(k) for k in node.keys()] if hasattr(node, "keys") else []


def explain(error: Exception, overrides: list[str], default: Any, config_dir: str | None = None) -> str:  # noqa: ANN401
    """One paragraph for a Hydra composition error: the key, the value, what is allowed
    (group options from ``config_dir`` too, the command's --config-dir)."""
    text = str(error)
    cause = error.__cause__ or error
    ctext = str(cause)
    m = re.search(r"Could not find '/?(hydra/[^']+)/([^'/]+)'", text)
    if m:  # a Hydra plugin group (hydra/launcher): Hydra lists its options
        allowed = re.findall(r"^\t(\S+)$", text.split("Available options", 1)[-1].split("Config search path", 1)[0], re.M)
        return f"Invalid value for '{m.group(1)}': {m.group(2)!r}. Allowed: {', '.join(allowed)}.{_closest(m.group(2), allowed)}"
    m = re.search(r"Could not find '/?([^'/]+)/([^']+)'", text)
    if m:
        group, option = m.group(1), m.group(2)
        allowed = _options(group, config_dir)
        return f"Invalid value for '{group}': {option!r}. Allowed: {', '.join(allowed)}.{_closest(option, allowed)}"
    m = re.search(r"Error merging override ~(\S+)", text)
    if m:
        return (f"'~{m.group(1)}' deletes '{m.group(1)}', a setting of pruneflow's typed schema, which a run needs. Set it "
                f"instead ({m.group(1)}=<value>; `pruneflow --cfg job` shows the current one).")
    m = re.search(r"Could not override '(published)'", text)
    if m:
        return (f"'{m.group(1)}' is not chosen on the command line: conf/published/ holds the published numbers that "
                "experiment/ configs read (e.g. experiment=seven_pre/plot1_bert_base). Choose the experiment instead; "
                "`pruneflow --help` lists them.")
    m = re.search(r"An item is already at '([^']+)'", text)
    if m:
        return (f"'+{m.group(1)}=...' adds a key, but '{m.group(1)}' is already set in the composed configuration "
                f"(overrides: {' '.join(overrides)}). Set it without the '+': {m.group(1)}=...")
    full_key = re.search(r"full_key: (\S+)", ctext) or re.search(r"full_key: (\S+)", text)
    key = full_key.group(1) if full_key else None
    unknown = "not in struct" in ctext or re.search(r"Key '[^']+' not in '", ctext) or "Could not append to config" in text
    if key and unknown:
        parent, _, leaf = key.rpartition(".")
        valid = [k for k in _keys_at(default, parent) if k != "_target_"]
        where = f"'{parent}'" if parent else "the top level"
        hint = f" Add a new key with +{key}=... where the key takes new entries." if parent.endswith("config_overrides") else ""
        if parent == "hydra.launcher" and len(valid) == 0:
            hint = " Choose a launcher first: hydra/launcher=joblib (n_jobs), submitit_local or submitit_slurm."
        return (f"Unknown key '{key}' (from the command line or an experiment). Valid keys at {where}: "
                f"{', '.join(sorted(valid)) or 'none'}.{_closest(leaf, valid)}{hint}")
    if key and ("could not be converted" in ctext or "Value '" in ctext or "Unsupported value type" in ctext):
        value = re.search(r"Value '([^']*)'", ctext)
        kind = re.search(r"converted to (\w+)", ctext)
        kind_name = kind.group(1) if kind else ("Boolean" if "valid bool" in ctext else "")
        what = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false", "String": "a string"}.get(kind_name, "a value of the key's type")
        if key == "sparsity":  # the same words as a number out of range
            what = SPARSITY_ALLOWED
        elif re.fullmatch(r"stages\.\w+\.(lr|batch_size)", key):
            what = "a positive number" if key.endswith(".lr") else "a positive integer"
        given = value.group(1) if value else "?"
        # a number as typed (seed=1.5, not '1.5': OmegaConf quotes every value it cannot convert)
        shown = given if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", given) else repr(given)
        return f"Invalid value for '{key}': {shown}. Allowed: {what}."
    given = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "?") if key else "?"
    if key and "is not a ListConfig" in ctext:
        return f"Invalid value for '{key}': {given!r}. Allowed: a list in brackets, e.g. {key}=[a,b] (or {key}=[] for none)."
    if key and "is not Optional" in ctext:  # null for a setting that must have a value
        now = OmegaConf.select(default, key) if default is not None else None
        example = f" (now {key}={now})" if now is not None and not OmegaConf.is_config(now) else ""
        return (f"Invalid value for '{key}': null. Allowed: a value; '{key}' cannot be null{example}. "
                "`pruneflow --cfg job` shows every setting and its value.")
    if key and "is not a subclass of" in ctext:  # a scalar where a section of settings belongs
        inner = sorted(k for k in _keys_at(default, key) if k != "_target_")
        return (f"Invalid value for '{key}': {given}. Allowed: its settings one by one, e.g. {key}.{inner[0] if inner else '<key>'}=..."
                f" ('{key}' is a section{': ' + ', '.join(inner) if inner else ''}).")
    if key and "Cannot convert" in ctext and "to string" in ctext:
        return f"Invalid value for '{key}': {given}. Allowed: one string (quote a value with commas or brackets: {key}='a,b')."
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"The configuration could not be composed: {first} (overrides: {' '.join(overrides)}). Run `pruneflow --cfg job` to see the composed configuration, or `pruneflow --help` for the groups and options."


class _Composed(NamedTuple):
    rows: list[list[str]]  # a table experiment's rows (hydra.sweeper.rows), else []
    params: list[str]  # the values an experiment sweeps (hydra.sweeper.params) as key=values, else []
    cfg: Any  # the composed config, None if it does not compose
    error: Exception | None  # what composing raised
    own_checked: bool  # the command line's own Hydra settings composed with it


def _sweeper_settings(compose: Any, overrides: list[str], own: list[str]) -> _Composed:  # noqa: ANN401
    """Compose ``overrides`` once and read the experiment's sweep from it, with the command
    line's own Hydra settings (``own``) if they compose: then they need no composition of
    their own (each costs ~0.5 s on 2 cores)."""
    error: Exception | None = None
    for extra in ([own, []] if own else [[]]):
        try:
            cfg = compose(config_name="config", overrides=[*extra, *overrides], return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - the composition error is reported by the caller
            error = e
            continue
        sweeper = cfg.hydra.sweeper
        rows = sweeper.get("rows") if "rows" in sweeper else None
        params = sweeper.get("params") if "params" in sweeper else None
        return _Composed([[str(o) for o in row] for row in rows or []], [f"{k}={v}" for k, v in (params or {}).items()],
                         cfg, None, bool(extra))
    return _Composed([], [], None, error, False)


# Sweeps up to this many jobs are checked job by job; larger ones one swept value at a time.
MAX_CHECKED_JOBS = 64


def sweep_variants(plain: list[Any]) -> tuple[list[str], list[list[str]]]:  # noqa: ANN401
    """The first job's overrides and those of every job of the sweep (the product of the
    swept values, as Hydra's basic sweeper runs them), or, for a larger sweep, every
    swept value once with the first value of the others."""
    import itertools
    import math

    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in plain]

    def line(i: int, v: str) -> str:
        return f"{plain[i].get_key_element()}={v}" if plain[i].is_sweep_override() else v

    base = [line(i, vs[0]) for i, vs in enumerate(values)]
    if math.prod(len(vs) for vs in values) <= MAX_CHECKED_JOBS:
        combos = itertools.product(*values)
        return base, [base, *([line(i, v) for i, v in enumerate(c)] for c in itertools.islice(combos, 1, None))]
    variants = [base]
    for i, vs in enumerate(values):
        variants += [[*base[:i], line(i, v), *base[i + 1 :]] for v in vs[1:]]
    return base, variants


def _is_config_dir_flag(name: str) -> bool:
    """``-cd``, ``--config-dir`` or an abbreviation of it that argparse accepts (``--config-d``)."""
    return name == "-cd" or (len(name) >= len("--config-d") and "--config-dir".startswith(name))


def config_dir_arg(argv: list[str]) -> str | None:
    """The folder given with --config-dir / -cd (any form argparse reads: ``-cd DIR``,
    ``-cd=DIR``, ``--config-dir=DIR``, ``--config-d DIR``); the last one, as Hydra takes it."""
    found = None
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if _is_config_dir_flag(name):
            found = value if eq else argv[i + 1] if i + 1 < len(argv) else found
    return found


def dirname_excluded(parsed: list[Any]) -> set[str]:
    """The keys a sweep job's folder name leaves out: conf/config.yaml's exclude_keys, or
    the command line's own value of them."""
    given = next((o for o in parsed if o.key_or_group == "hydra.job.config.override_dirname.exclude_keys"), None)
    if given is not None:
        return {str(k) for k in given.value() or []}
    from omegaconf import OmegaConf

    conf = OmegaConf.load(os.path.join(CONFIG_DIR, "config.yaml"))
    return {str(k) for k in OmegaConf.select(conf, "hydra.job.config.override_dirname.exclude_keys", default=[]) or []}


def _first_value(override: Any) -> str:  # noqa: ANN401
    values = list(override.sweep_iterator()) if override.is_discrete_sweep() else []
    return str(values[0]) if values else "..."


def precheck(argv: list[str]) -> str | None:
    """Compose the configuration of every sweep value before Hydra runs anything, so that
    a misspelt key, a wrong type or an unknown option is one clear paragraph."""
    from pruneflow.validation import SWEEP_SHARED_ENV

    os.environ.pop(SWEEP_SHARED_ENV, None)  # set below for this command's sweep only
    modes = sorted({MODE_FLAGS[a.split("=")[0]] for a in argv if a.split("=")[0] in MODE_FLAGS})
    if len(modes) > 1:
        how = (" To see the configuration of one job of a sweep, give that job's values without -m: "
               "pruneflow <overrides> --cfg job." if "-m" in modes and "--cfg" in modes else "")
        return f"{' and '.join(modes)} cannot be given together: a command either runs, runs a sweep (-m), prints its configuration (--cfg) or describes it (--info).{how}"
    if any(a.split("=")[0] in OTHER_CONFIG_FLAGS for a in argv):
        return None
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args: list[str] = []
    for i, a in enumerate(argv):
        # Hydra flags that take a value (--cfg job, -p model): the value is no override
        prev = argv[i - 1] if i > 0 else ""
        if a.startswith("-") or prev in FLAGS_WITH_VALUE or _is_config_dir_flag(prev):
            continue
        args.append(a)
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
        return f"Could not read the command line: {str(e).splitlines()[0]}. Overrides are key=value (e.g. sparsity=0.7, method=seven); a sweep gives values separated by commas after -m."
    multirun = any(a in ("-m", "--multirun") for a in argv)
    out_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    out = next((str(o.value()) for o in parsed if o.key_or_group == out_key and not o.is_sweep_override()), "outputs")
    if not out.strip():  # an empty folder is the current directory: the run's files would mix with whatever is there
        return (f"Invalid value for '{out_key}': it is empty, which would write the run's files into the current "
                f"directory. Allowed: a folder this user can create and write, e.g. {out_key}=outputs/my_run "
                f"(left out, the folder is {'outputs/multirun/<day>/<time>' if multirun else 'outputs/<day>/<time>'}).")
    problem = unwritable(Path(out.split("${")[0] or "."))
    if problem:
        return f"Invalid value for '{out_key}': {out} cannot be written ({problem}). Allowed: a folder this user can create and write, e.g. {out_key}=outputs/my_run."
    for o in parsed:
        if not o.key_or_group:
            return f"Could not read the command line: '{o.input_line}' has no key. Overrides are key=value (e.g. sparsity=0.7, method=seven)."
    swept = next((o for o in parsed if o.key_or_group.startswith("hydra") and o.is_sweep_override()), None)
    if swept is not None:  # Hydra refuses it with its raw text after the launch started
        key = swept.get_key_element()
        setting = key.removeprefix("hydra.sweeper.params.") if key.startswith("hydra.sweeper.params.") else None
        how = (f"sweep the setting itself: pruneflow -m {setting}=<values> (hydra.sweeper.params is what an experiment file sets)"
               if setting else "give it one value per command")
        return f"'{swept.input_line}' sweeps Hydra's own setting '{key}', which Hydra does not allow. Instead, {how}."
    removed = next((o for o in parsed if o.is_delete() and "." not in o.key_or_group and not o.key_or_group.startswith("hydra")), None)
    if removed is not None:  # a run needs every top-level setting: deleting one crashed the run or reverted it silently
        key = removed.key_or_group
        how = (f"choose another option ({key}=<option>; `pruneflow --help` lists them)" if key in GROUPS
               else f"set it ({key}=<value>; `pruneflow --cfg job` shows the current one)")
        return f"'{removed.input_line}' deletes '{key}', a top-level setting every run needs. Instead, {how}."
    renamed = next((o for o in parsed if o.key_or_group.count(".") == 1 and o.key_or_group.endswith(".name")
                    and o.key_or_group.split(".")[0] in GROUPS and not o.input_line.startswith("~")), None)
    if renamed is not None:  # it relabels the chosen option without loading the other one's settings
        group = renamed.key_or_group.split(".")[0]
        value = renamed.input_line.split("=", 1)[1] if "=" in renamed.input_line else ""
        return (f"'{renamed.input_line}' renames the {group} without choosing it: the run would keep the settings of "
                f"the {group} it has and record another name. Choose the option itself: {group}={value or '<option>'} "
                "(`pruneflow --help` lists them).")
    n_jobs = next((o for o in parsed if o.key_or_group == "hydra.launcher.n_jobs" and not o.is_sweep_override()), None)
    if n_jobs is not None:  # joblib's own error comes after the sweep folder is made
        v = n_jobs.value()
        if isinstance(v, bool) or not isinstance(v, int) or v == 0:
            return (f"Invalid value for 'hydra.launcher.n_jobs': {n_jobs.input_line.split('=', 1)[1]}. Allowed: an integer, "
                    "the jobs run at once (>= 1) or, negative, counted from the CPU cores as joblib does (-1: one per CPU core).")
    if any(o.key_or_group == "hydra.searchpath" for o in parsed):  # config groups from elsewhere: Hydra checks
        return None
    # --config-dir DIR: the user's own configs (experiments, models) beside the shipped ones,
    # composed here as Hydra will compose them; a missing folder is Hydra's error to report.
    extra = config_dir_arg(argv)
    if extra is not None and (not Path(extra).is_dir() or "'" in extra or "\\" in extra):
        return None  # a missing folder, or a path this override cannot quote: Hydra reports or runs it
    search = [f"hydra.searchpath=['file://{Path(extra).resolve()}']"] if extra is not None else []

    def compose(config_name: str, overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Any:  # noqa: ANN401
        return hydra_compose(config_name=config_name, overrides=[*search, *overrides], **kw)

    plain = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    excluded = dirname_excluded(parsed) if multirun else set()
    shared = [o for o in plain if o.is_sweep_override() and o.get_key_element() in excluded]
    if multirun and shared:
        key = shared[0].get_key_element()
        return (f"'{shared[0].input_line}' sweeps '{key}', which job folder names leave out "
                "(hydra.job.config.override_dirname.exclude_keys: settings that do not change what a run computes), so "
                f"its jobs would share one folder and the later ones would find the first one's result. Run one sweep per "
                f"value, each with its own hydra.sweep.dir (e.g. pruneflow -m ... {key}={_first_value(shared[0])} "
                f"hydra.sweep.dir=outputs/sweeps/{key.replace('/', '_')}={_first_value(shared[0])}).")
    several = next((o for o in plain if o.is_sweep_override()), None)
    if several is not None and not multirun:
        return (f"'{several.input_line}' gives '{several.get_key_element()}' several values: run them as a sweep with -m "
                f"(pruneflow -m {' '.join(args)}), or quote a value meant as one string: {several.get_key_element()}='a,b'.")
    base, variants = sweep_variants(plain)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            # Hydra's own settings (hydra/launcher=..., hydra.launcher.n_jobs=...): Hydra would
            # report a mistake in them with its raw text after the sweep started
            own = [o.input_line for o in parsed if o.key_or_group.startswith("hydra") and o.key_or_group != "hydra.searchpath"
                   and not o.is_sweep_override()]
            rows, params, composed, base_error, own_checked = _sweeper_settings(compose, base, own)
            base_composed = composed is not None
            if composed is not None and not multirun:  # before the runner (and torch) is imported
                from pruneflow.validation import validate_sparsity

                try:
                    validate_sparsity(composed.get("sparsity"))
                except UserError as e:
                    return str(e)
            given = {o.get_key_element() for o in plain}
            params = [o for o in OverridesParser.create().parse_overrides(params) if o.get_key_element() not in given]
            if params and not multirun and composed is not None:  # the experiment's sweep, run as one job: say which
                from omegaconf import OmegaConf

                name = next((a for a in base if a.startswith("experiment=")), "this experiment")
                chosen = [OmegaConf.select(composed, o.get_key_element()) for o in params]
                one = " ".join(f"{o.get_key_element()}={v.get('name') if OmegaConf.is_dict(v) else 'null' if v is None else v}"
                               for o, v in zip(params, chosen, strict=True))  # a group: its option
                print(f"pruneflow: note: '{name}' sweeps {', '.join(o.get_key_element() for o in params)} when run with -m "
                      f"(pruneflow -m {' '.join(args)}); this one run takes {one}.", file=sys.stderr)
            if multirun and params:  # the command line's values take precedence, as in Hydra's sweeper
                base, variants = sweep_variants([*params, *plain])
                base_composed = False
            if rows and not multirun:
                name = next((a for a in base if a.startswith("experiment=")), "this experiment")
                return (f"'{name}' is a table of {len(rows)} runs (hydra.sweeper.rows): run it as a sweep, "
                        f"pruneflow -m {' '.join(args)}; or run one of its rows, e.g. pruneflow {' '.join(rows[0])}.")
            if rows:  # every row, with this command line's settings
                from hydra_plugins.pruneflow_rows_sweeper.rows_sweeper import merge_row

                variants = [merge_row(v, row) for v in variants for row in rows]
            # a key added with +key=... that nothing reads: one more composition per variant
            adds = any(o.input_line.startswith("+") for o in plain)
            # a sweep: every job's settings are checked now, not when its turn comes hours later;
            # jobs sent to Slurm start elsewhere, so this machine's devices say nothing about them
            here = not any(o.key_or_group == "hydra/launcher" and "slurm" in str(o.value()) for o in parsed)
            if multirun and len(variants) > 8:
                print(f"pruneflow: checking the settings of {len(variants)} jobs ...", file=sys.stderr)
            def of_job(overrides: list[str], problem: str) -> str:  # a sweep's error names the job it is about
                if multirun:
                    return f"A job of this sweep ({' '.join(overrides)}) has a wrong setting, so no job was started: {problem}"
                return problem

            single: Any = None  # a run's (or --cfg's) config, checked once Hydra's own settings are
            # settings given once for the whole sweep that a job would ignore: the jobs that skip each
            # (and the first message); fine as long as some job uses it (a swept one: never)
            given_once = {o.get_key_element() for o in plain if not o.is_sweep_override()}
            skipped_by: dict[str, list[tuple[list[str], str]]] = {}
            for overrides in variants:
                try:
                    if overrides is base and base_error is not None:  # composed above: the same error again
                        raise base_error
                    # each composition costs ~0.5 s on a 2-core VM: the first job's is the one above
                    cfg = _job_config(composed) if overrides is base and base_composed else compose(config_name="config", overrides=overrides)
                except Exception as e:  # noqa: BLE001 - every composition error is the user's
                    # the valid keys under the groups this command line chose
                    choices = [o for o in overrides if o.split("=")[0].lstrip("+~") in GROUPS]
                    try:
                        default = compose(config_name="config", overrides=choices)
                    except Exception:  # noqa: BLE001 - a bad group choice itself
                        default = compose(config_name="config")
                    return of_job(overrides, explain(e, overrides, default, extra))
                if adds:
                    from pruneflow.validation import unknown_key_problem

                    problem = unknown_key_problem(cfg)
                    if problem:
                        return of_job(overrides, problem)
                if not multirun:
                    single = cfg
                    continue
                from pruneflow.errors import UnusedSetting
                from pruneflow.runner import check_settings
                from pruneflow.validation import SWEEP_SHARED_CHECKING

                SWEEP_SHARED_CHECKING.clear()  # each job finds the shared settings it would ignore itself
                while True:  # the job's check again past each shared setting it would ignore
                    try:
                        check_settings(cfg, here, overrides)
                        break
                    except UnusedSetting as e:
                        if e.key not in given_once or any(job is overrides for job, _ in skipped_by.get(e.key, [])):
                            return of_job(overrides, str(e))
                        skipped_by.setdefault(e.key, []).append((overrides, str(e)))
                        SWEEP_SHARED_CHECKING.add(e.key)
                    except UserError as e:
                        return of_job(overrides, str(e))
            if skipped_by:
                from pruneflow.validation import SWEEP_SHARED_ENV

                unused = next(((key, jobs) for key, jobs in skipped_by.items() if len(jobs) == len(variants)), None)
                if unused is not None:  # no job of the sweep uses it
                    return of_job(*unused[1][0])
                os.environ[SWEEP_SHARED_ENV] = ",".join(sorted(skipped_by))  # the jobs log it (joblib's workers inherit it)
                print("pruneflow: note: " + "; ".join(f"{key} is not used by {len(jobs)} of the {len(variants)} jobs" for key, jobs in
                                                    sorted(skipped_by.items())) + " (each such job's log names it).", file=sys.stderr)
            if own and not own_checked:
                try:
                    compose(config_name="config", overrides=[*own, *base], return_hydra_config=True)
                except Exception as e:  # noqa: BLE001 - every composition error is the user's
                    launcher = [o for o in own if o.startswith("hydra/launcher=")]
                    try:
                        default = compose(config_name="config", overrides=launcher, return_hydra_config=True)
                    except Exception:  # noqa: BLE001 - the launcher choice itself is wrong
                        default = compose(config_name="config", return_hydra_config=True)
                    return explain(e, own, default, extra)
            if single is not None:
                # a run's settings are checked before Hydra makes its folder and starts it (--cfg's: as
                # the run would check them); the run checks them again as it starts (as the Python API
                # and a sweep's jobs do), reusing the groups' defaults composed here
                from pruneflow.runner import check_settings

                try:
                    check_settings(single, here, base)
                except UserError as e:
                    return str(e)
    finally:
        GlobalHydra.instance().clear()
        if multirun:
            from pruneflow.validation import SWEEP_SHARED_CHECKING

            SWEEP_SHARED_CHECKING.clear()
    return None


def _job_config(cfg: Any) -> Any:  # noqa: ANN401
    """A config composed with return_hydra_config=True as Hydra hands it to a job: without
    its ``hydra`` node (changed in place)."""
    from omegaconf import open_dict, read_write

    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _sweep_hint(sweep_dirs: list[str]) -> str:
    return folder_hint("hydra.sweep.dir", sweep_dirs[0], typed_hydra_overrides()) if len(sweep_dirs) == 1 else ""


class QuietAfterStop(logging.Filter):
    """Drops a logger's records once a stop was asked for (see ``_app``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pruneflow.stop import STOP

        return STOP.requested() is None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from pruneflow.runner import holds_run, run
    from pruneflow.stop import STOP, name

    guard_console()  # again in a launcher's worker process (joblib, submitit)
    hub_logs_through_root()  # after Hydra's logging setup (a launcher's worker sets it up again)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    record = hydra_record(cfg)
    if multirun:
        # A job in a launcher's worker process (joblib, submitit_local): Ctrl-C stops it with a
        # checkpoint (not a traceback), and so does a signal sent to the launching process only.
        STOP.install()
        if local_process_launcher(hc):
            STOP.watch(Path(hc.sweep.dir))
        # Hydra's basic launcher prints "#n : <overrides>" as it reaches each job, also after a
        # stop, when the job is only marked "Not started": those lines read as if the jobs ran
        launcher_log = logging.getLogger("hydra._internal.core_plugins.basic_launcher")
        if not any(isinstance(f, QuietAfterStop) for f in launcher_log.filters):
            launcher_log.addFilter(QuietAfterStop())
    if multirun:
        signum = STOP.requested()
        if signum is not None:
            if not holds_run(run_dir):  # the report lists the job by its .hydra/ record
                record(run_dir)
            _write_job_file(run_dir, STOPPED_FILE, f"Not started: the sweep was stopped by {name(signum)} before this job began. "
                                    "Run the same command again to run it.")
            return None
    hint = "" if multirun else folder_hint("hydra.run.dir", run_dir, list(hc.overrides.hydra))  # a sweep's: by main()
    # a second signal stops at once with a line of its own: it names the folder too
    STOP.resume_hint = folder_hint("hydra.sweep.dir", hc.sweep.dir, list(hc.overrides.hydra)) if multirun else hint
    try:
        result = run(cfg, run_dir, list(hc.overrides.task), record=record)
    except RunStopped as e:
        message = str(e) + hint
        _log_to_file(logging.WARNING, message)
        _report_error(message, label="stopped")  # asked for, not an error
        _write_job_file(run_dir, STOPPED_FILE, message)  # pruneflow-report lists the run as stopped, and where
        if multirun:  # the launching process lists the stopped jobs and exits 130/143; under Hydra's basic
            return None  # launcher (in this process) the jobs still queued are marked "Not started" first
        sys.exit(EXIT_CODES.get(e.signum, 1))
    except UserError as e:
        message = str(e) + (hint if isinstance(e, TrainingDiverged) else "")
        _log_to_file(logging.ERROR, message)
        _report_error(message)
        if multirun:  # one failing job does not stop the other jobs of a sweep
            _write_job_file(run_dir, "error.txt", str(e))
            return None
        if getattr(e, "before_work", False):  # a setting was wrong: leave no half-written run folder
            _remove_if_only_hydra(run_dir, default_layout=_default_run_dir(hc))
        sys.exit(2)
    except Exception:
        from pruneflow import distributed

        # torchrun: a crash on one rank must stop all ranks (the others wait in a collective)
        if not multirun or distributed.is_distributed():
            raise
        log.error("Job failed:\n%s", traceback.format_exc())
        _write_job_file(run_dir, "error.txt", traceback.format_exc())
        return None
    if not multirun:  # a sweep says where its jobs went once they have all ended
        print(f"pruneflow: result in {run_dir / 'result.json'}")
    final = result["metrics"]["final"]
    return final.get(result["main_metric"])


RECORD_DIR = ".hydra"


def hydra_record(cfg: DictConfig) -> Callable[[Path], None]:
    """What Hydra writes into a job's folder as it starts (``.hydra/config.yaml``,
    ``hydra.yaml``, ``overrides.yaml``), written by the runner once the folder is this
    command's instead (conf/config.yaml sets ``hydra.output_subdir: null``): Hydra's
    would also replace the record of a run in the folder when the runner then refuses
    the command (other settings, the folder in use by another process). The text is
    taken now, before the run changes anything."""
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.create(OmegaConf.to_container(HydraConfig.instance().cfg, resolve=False))
    hydra_cfg.hydra.output_subdir = RECORD_DIR  # where the record is, as Hydra's own says
    texts = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        "overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task),
    }

    def write(run_dir: Path) -> None:
        from pruneflow.utils import atomic_write_text

        (run_dir / RECORD_DIR).mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            atomic_write_text(run_dir / RECORD_DIR / name, text)

    return write


def _log_to_file(level: int, message: str) -> None:
    """Into pruneflow.log only: the terminal gets the message once, as one paragraph."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _default_run_dir(hc: Any) -> bool:  # noqa: ANN401 - Hydra's config node
    """Whether ``hydra.run.dir`` is conf/config.yaml's (``outputs/<day>/<time>``), unresolved."""
    from omegaconf import OmegaConf

    try:
        raw = hc.run._get_node("dir")._value()
        shipped = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").hydra.run._get_node("dir")._value()
    except Exception:  # noqa: BLE001 - any other shape: not the default layout
        return False
    return raw == shipped


def _remove_if_only_hydra(run_dir: Path, default_layout: bool = False) -> None:
    """A run stopped by a wrong setting before any work: its folder holds only what Hydra
    wrote when it started (.hydra/, the log); remove it. In the default layout, also its
    day folder (``outputs/<YYYY-MM-DD>/``) when that leaves it empty; a folder of the
    user's own ``hydra.run.dir`` is never removed above the run's."""
    import shutil

    logging.shutdown()  # close pruneflow.log before removing it
    keep = {".hydra", "pruneflow.log", ".pruneflow.lock"}
    try:
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= keep:
            shutil.rmtree(run_dir)
            day = run_dir.parent
            if default_layout and not any(day.iterdir()):
                day.rmdir()
    except OSError:
        pass


def _write_job_file(run_dir: Path, name: str, text: str) -> None:
    """A sweep job's error.txt (it failed), or a run's stopped.txt (a signal stopped it, or
    kept a sweep's job from starting): the launcher and pruneflow-report list the run with
    the file's last line."""
    try:
        (run_dir / name).write_text(text if text.endswith("\n") else text + "\n")
    except OSError as e:  # an unwritable job directory must not hide the job's own error
        log.error("Could not write %s: %s", run_dir / name, e)


def main() -> None:
    guard_console()  # a dropped `| tee` or SSH session must not end the run
    if "--version" in sys.argv[1:]:  # Hydra's own answer names only Hydra's version
        from importlib.metadata import version

        print(f"pruneflow {version('pruneflow')} (Hydra {version('hydra-core')})")
        sys.exit(0)
    register_configs()
    message = precheck(sys.argv[1:])
    if message:
        _report_error(message)
        sys.exit(2)
    from pruneflow.config import SWEEP_STOPPED
    from pruneflow.stop import STOP

    STOP.launcher_pid = os.getpid()
    STOP.install()
    from concurrent.futures.process import BrokenProcessPool

    from pruneflow.config import SWEEP_DIRS

    if {"-m", "--multirun"} & set(sys.argv[1:]):
        # Hydra prints a launcher's exception and exits 1 unless HYDRA_FULL_ERROR is set; set, it
        # re-raises it here (a joblib worker killed: TerminatedWorkerError), to be told in one paragraph
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _app()
    except BrokenProcessPool as e:  # joblib's TerminatedWorkerError: a worker killed (out of memory, kill -9)
        _report_error(
            f"A worker process of the sweep's launcher died ({type(e).__name__}), e.g. killed by the system for lack of "
            "memory. joblib then ends the whole sweep: the jobs that were running stop where they are (their last "
            "checkpoints are kept) and queued jobs do not start. Run the same command again to resume them; finished "
            "jobs are not run again." + _sweep_hint(SWEEP_DIRS) + " Fewer parallel jobs (hydra.launcher.n_jobs) need less memory."
        )
        _list_unfinished(SWEEP_DIRS)
        sys.exit(1)
    finally:  # a request left in the sweep folder would stop the next launch's jobs (it also clears it)
        STOP.forget_stop_file()
        from pruneflow.validation import SWEEP_SHARED_ENV

        os.environ.pop(SWEEP_SHARED_ENV, None)

    for sweep_dir in SWEEP_DIRS:  # where the jobs went, and the next step the README gives
        print(f"pruneflow: the sweep's jobs are in {sweep_dir}; compare them with: pruneflow-report {sweep_dir}")
    failed = sweep_failures()
    if failed:
        print(f"\npruneflow: {len(failed)} job(s) of the sweep failed (their error.txt):", file=sys.stderr)
        for path, reason in failed:
            print(f"  {path}: {reason}", file=sys.stderr)
    if SWEEP_STOPPED:
        queued = sum(reason.startswith("Not started") for _, reason in SWEEP_STOPPED)
        print(f"\npruneflow: {len(SWEEP_STOPPED)} job(s) of the sweep were stopped ({len(SWEEP_STOPPED) - queued} while running, "
              f"{queued} before they started; their {STOPPED_FILE}); run the same command again to resume them (finished "
              "jobs are not run again)." + _sweep_hint(SWEEP_DIRS), file=sys.stderr)
        for path, reason in SWEEP_STOPPED:
            print(f"  {path}: {reason}", file=sys.stderr)
    if STOP.signum is not None or SWEEP_STOPPED:
        sys.exit(EXIT_CODES.get(STOP.signum, 1))  # type: ignore[arg-type]
    if failed:
        sys.exit(1)


def _list_unfinished(sweep_dirs: list[str]) -> None:
    from pathlib import Path

    from pruneflow.report import find_incomplete

    for sweep_dir in sweep_dirs:
        failed, unfinished = find_incomplete(Path(sweep_dir), set())
        jobs = [*failed, *unfinished]
        if jobs:
            print(f"\npruneflow: {len(jobs)} job(s) in {sweep_dir} have no result:", file=sys.stderr)
            for job in jobs:
                print(f"  {job.path}: {job.reason}", file=sys.stderr)


def sweep_failures() -> list[tuple[str, str]]:
    """After a sweep: the jobs that failed in this launch (recorded by the sweep callback)."""
    from pruneflow.config import SWEEP_FAILURES

    return list(SWEEP_FAILURES)


if __name__ == "__main__":
    main()
