"""The ``fedfm`` command line.

``fedfm run`` fine-tunes locally through the KFP pipeline under ``kfp.local``; ``fedfm compile`` writes
that pipeline's YAML for the Kubeflow UI. Both take a config file and/or flags; flags override the
file, and with neither the embedded default runs (all-MiniLM-L6-v2 on the built-in topics data, 4
tenants, 3 rounds). ``fedfm simulate`` runs the same federation in this process, without KFP.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedfm.config import FederationConfig, load_config
from fedfm.errors import FedFMError
from fedfm.pipelines.local_runner import STEP_RUNNERS
from fedfm.report import quality_metric

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated fine-tuning of foundation models (PEFT LoRA + DeepSpeed) as Kubeflow Pipelines.")


def _console() -> Console:
    """A console on the stdout of this moment: the local runner later redirects ``sys.stdout`` into
    run.log, and the display must keep writing to the terminal. Where that is no terminal (a file, a pipe, a
    CI log), lines keep their length and tables their width: nothing wrapped mid-word or cut."""
    console = Console(file=sys.stdout)
    if console.is_terminal:
        return console
    return Console(file=sys.stdout, soft_wrap=True, width=max(console.width, 200))


class TaskName(str, enum.Enum):
    classification = "classification"
    causal_lm = "causal-lm"
    preference = "preference"


# How `fedfm run` runs each step (fedfm.pipelines.local_runner.STEP_RUNNERS, the one list of them).
StepRunner = enum.Enum("StepRunner", {name: name for name in STEP_RUNNERS}, type=str)


# option name -> (config path, type, help). Every command that builds a config takes all of them.
_CONFIG_FLAGS: dict[str, tuple[str, Any, str]] = {
    "model": ("model.name_or_path", Optional[str], "Hugging Face model id or local directory."),
    "task": ("task", Optional[TaskName], "What the model learns."),
    "dataset": ("data.source", Optional[str], "CSV/JSONL/Parquet file, HF datasets id, or builtin:topics."),
    "text_column": ("data.text_column", Optional[str], "Text column(s), comma-separated (classification)."),
    "label_column": ("data.label_column", Optional[str], "Label column (classification)."),
    "prompt_column": ("data.prompt_column", Optional[str], "Prompt column (causal-lm)."),
    "response_column": ("data.response_column", Optional[str], "Response column (causal-lm)."),
    "max_samples": ("data.max_samples", Optional[int], "Use at most this many rows of the dataset."),
    "clients": ("clients", Optional[int], "Number of simulated tenants (leave it out with --partition column:NAME: "
                                          "one tenant per value, named after it; another number is an error)."),
    "partition": ("data.partition", Optional[str], "How tenants split the data: iid, dirichlet:ALPHA, column:NAME "
                                                   "(one tenant per value of the column)."),
    "rounds": ("rounds", Optional[int], "Federated rounds."),
    "local_steps": ("training.local_steps", Optional[int], "Optimizer steps per client per round."),
    "local_epochs": ("training.local_epochs", Optional[float], "Epochs over the client's data per round."),
    "batch_size": ("training.batch_size", Optional[int], "Examples per optimizer step."),
    "learning_rate": ("training.learning_rate", Optional[float], "AdamW learning rate."),
    "lora_r": ("lora.r", Optional[int], "LoRA rank."),
    "head_init": ("head.init", Optional[str], "Classification head in round 1: prototypes (each client's class "
                                              "means, the default) or random."),
    "head_aggregation": ("head.aggregation", Optional[str], "Classification head rows: per-class (averaged over "
                                                            "the clients holding the class, the default) or samples."),
    "strategy": ("strategy.name", Optional[str], "Aggregation rule: fedavg, fedavgm, fedadam, fedyogi, fedadagrad, "
                                                  "fedprox, fedmedian, fedtrimmedavg, krum, multikrum, hetlora, "
                                                  "flexlora, flora, ffalora, fedsalora."),
    "strategy_params": ("strategy.params", Optional[str], "The rule's parameters as JSON, e.g. '{\"eta\": 0.01}'."),
    "clip_norm": ("strategy.clip_norm", Optional[float], "Scale each client update to at most this L2 norm."),
    "target_epsilon": ("privacy.target_epsilon", Optional[float], "Differential privacy: the run's ε budget at "
                                                                   "--delta (DP-FedAvg; needs --dp-clip-norm)."),
    "noise_multiplier": ("privacy.noise_multiplier", Optional[float], "Differential privacy: noise σ / clip norm."),
    "delta": ("privacy.delta", Optional[float], "Differential privacy: δ (default 1e-5)."),
    "dp_clip_norm": ("privacy.clip_norm", Optional[float], "Differential privacy: each client's clip norm C."),
    "secure_aggregation": ("secure_aggregation.enabled", Optional[bool], "Secure aggregation: the server sees only "
                                                                         "masked updates and their sum."),
    "compression": ("compression.method", Optional[str], "Encode updates: none, fp16, bf16, int8, topk."),
    "zero_stage": ("training.zero_stage", Optional[int], "DeepSpeed ZeRO stage (0-3)."),
    "bf16": ("training.bf16", Optional[bool], "Train in bf16 (DeepSpeed mixed precision)."),
    "world_size": ("training.world_size", Optional[int], "DeepSpeed processes per client."),
    "parallelism": ("parallelism", Optional[int], "Clients trained at once."),
    "seed": ("seed", Optional[int], "Seed for partitioning, initialization and batch order."),
    "centralized": ("centralized", Optional[bool], "Pool all tenants' data in one client with the same total "
                                                   "optimizer steps: the baseline for federated quality."),
}


def _with_config(command):
    """Give ``command`` a ``--config`` option plus every config flag; it receives the built config as ``cfg``."""
    own = [parameter for parameter in inspect.signature(command).parameters.values() if parameter.name != "cfg"]
    flags = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", "-c", help="Federation config (YAML or JSON).",
                                               exists=True, dir_okay=False)),
    ]
    for name, (_, annotation, help_text) in _CONFIG_FLAGS.items():
        option = f"--{name.replace('_', '-')}"
        declarations = [f"{option}/--no-{name.replace('_', '-')}"] if annotation is Optional[bool] else [option]
        flags.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                       default=typer.Option(None, *declarations, help=help_text,
                                                            rich_help_panel="Federation")))

    @functools.wraps(command)
    def wrapper(**kwargs):
        from fedfm.data import resolve_labels

        config_path = kwargs.pop("config")
        overrides = {}
        given = [name for name in _CONFIG_FLAGS if kwargs[name] is not None] + (["config"] if config_path else [])
        if kwargs.get("resume") is not None:  # the run goes on with the config it started with
            if given:
                raise typer.BadParameter(f"a resumed run keeps the config it started with; drop "
                                         f"{', '.join('--' + name.replace('_', '-') for name in given)}",
                                         param_hint="--resume")
            return command(cfg=None, **{key: value for key, value in kwargs.items() if key not in _CONFIG_FLAGS})
        for name, (path, _, _) in _CONFIG_FLAGS.items():
            value = kwargs.pop(name)
            if name == "strategy_params" and value is not None:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise typer.BadParameter(f"not JSON: {exc}", param_hint="--strategy-params") from None
            overrides[path] = value.value if isinstance(value, enum.Enum) else value
        cfg = load_config(config_path) if config_path else FederationConfig()
        cfg = resolve_labels(cfg.with_overrides(overrides))
        return command(cfg=cfg, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + flags)
    return wrapper


# The options `fedfm run` and `fedfm simulate` share (beside every config flag).
_RUN_OUTPUT = typer.Option(None, "--output", "-o", help="Run directory (default runs/NAME-TIME).")
_PUSHGATEWAY = typer.Option(None, "--pushgateway", envvar="FEDFM_PUSHGATEWAY",
                            help="Push the run's metrics to this Prometheus Pushgateway URL.")
_RESUME = typer.Option(None, "--resume", help="Continue the interrupted run in this directory after its last "
                                              "checkpointed round, with the config it started with.",
                       file_okay=False, exists=True)


@app.command()
@_with_config
def run(
    cfg: Optional[FederationConfig],
    output: Optional[Path] = _RUN_OUTPUT,
    pushgateway: Optional[str] = _PUSHGATEWAY,
    resume: Optional[Path] = _RESUME,
    runner: StepRunner = typer.Option(StepRunner.subprocess, "--runner",
                                      help="How each step runs: a Python subprocess here, or a container of "
                                           "--image through a Docker engine API (Docker, or podman's)."),
    image: Optional[str] = typer.Option(None, "--image", help="With --runner docker: the component image "
                                                              "(default: the released one)."),
) -> None:
    """Run a federated fine-tune locally through the KFP pipeline (kfp.local)."""
    if resume is not None and (runner is not StepRunner.subprocess or image is not None):
        raise typer.BadParameter("a resumed run runs its steps as it started; drop --runner and --image",
                                 param_hint="--resume")
    if image is not None and runner is not StepRunner.docker:
        raise typer.BadParameter("--image is the image of --runner docker", param_hint="--image")
    _run_locally(cfg, output, pushgateway, simulated=False, resume=resume, steps=runner.value, image=image)


@app.command()
@_with_config
def simulate(
    cfg: Optional[FederationConfig],
    output: Optional[Path] = _RUN_OUTPUT,
    pushgateway: Optional[str] = _PUSHGATEWAY,
    resume: Optional[Path] = _RESUME,
    attack: Optional[str] = typer.Option(None, "--attack", help="Make some clients Byzantine: sign-flip[:SCALE], "
                                                                "scale[:FACTOR], gaussian[:STD], nan, label-flip."),
    attackers: float = typer.Option(0.2, "--attackers", help="With --attack: the share (below 1) or number of "
                                                             "clients that attack, drawn with the seed."),
) -> None:
    """Simulate the federation in this process, without KFP: clients train one after another on a model
    loaded once (research, benchmarks, many clients). Same results as `fedfm run`."""
    if attack is not None and resume is not None:
        raise typer.BadParameter("a resumed run attacks as it started; drop --attack", param_hint="--attack")
    plan = None
    if attack is not None:
        from fedfm.attacks import choose_attackers, parse_attack

        plan = (parse_attack(attack), choose_attackers(cfg.training_clients, attackers, cfg.seed))
    _run_locally(cfg, output, pushgateway, simulated=True, resume=resume, attack=plan)


def _run_locally(cfg: Optional[FederationConfig], output: Optional[Path], pushgateway: Optional[str], *,
                 simulated: bool, resume: Optional[Path] = None, attack: Optional[tuple] = None,
                 steps: str = "subprocess", image: Optional[str] = None) -> None:
    """`fedfm run` (the pipeline under kfp.local) or `fedfm simulate` (in process), with live progress
    and a summary; with ``resume``, of the interrupted run in that directory."""
    from fedfm.data import describe_clients
    from fedfm.pipelines.local_runner import claim_output, run_config, run_local
    from fedfm.preflight import check_inputs
    from fedfm.simulation import check_simulated, simulate as simulate_federation

    if resume is not None:
        if output is not None and output.resolve() != resume.resolve():
            raise typer.BadParameter("a resumed run writes into its own directory; drop --output",
                                     param_hint="--output")
        output, cfg = resume, run_config(resume)
    if simulated:
        check_simulated(cfg)  # before the output directory is made
    check_inputs(cfg)  # a missing model, dataset or unusable storage fails here, before any work
    console = _console()
    output = output or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    reporter = None
    if pushgateway:
        from fedfm.pushgateway import PushgatewayReporter

        reporter = PushgatewayReporter(pushgateway, cfg.name)  # an unreachable URL fails here, before any work
    if resume is None:
        claim_output(output)
    command = "fedfm simulate" if simulated else "fedfm run"
    if resume is not None:
        console.print(_resuming(cfg, output))
    mode = "centralized baseline" if cfg.centralized else f"{len(cfg.clients)} tenants"
    console.print(f"[bold]FedFM{' simulation' if simulated else ''}[/] {cfg.task} · {cfg.model.name_or_path} · "
                  f"{cfg.data.source} ({cfg.partition}) · {mode} · {cfg.rounds} rounds · {cfg.strategy.name}")
    console.print(_tenant_table(cfg, describe_clients(cfg)))
    if cfg.privacy.enabled:
        console.print(_privacy_summary(cfg))
    progress = RunProgress(cfg)
    with Live(progress.render(), console=console, refresh_per_second=4, auto_refresh=console.is_terminal,
              redirect_stdout=False, redirect_stderr=False) as live:
        def on_event(event: dict[str, Any]) -> None:
            if reporter:
                reporter.on_event(event)
            line = progress.update(event)
            if console.is_terminal:
                live.update(progress.render())
            elif line:
                live.console.print(line, markup=False, highlight=False)  # "[round 1]" is text, not markup

        try:
            if simulated:
                attacks = {} if attack is None else {"attack": attack[0], "attackers": attack[1]}
                result = simulate_federation(cfg, output, on_event=on_event, resume=resume is not None, **attacks)
            else:
                result = run_local(cfg, output, on_event=on_event, resume=resume is not None, steps=steps,
                                   image=image)
        except KeyboardInterrupt:
            live.stop()
            Console(stderr=True, soft_wrap=True).print(
                f"interrupted: `{command} --resume {output}` goes on after the last round that finished; "
                f"`fedfm status {output}` shows where it stopped", highlight=False)
            raise typer.Exit(130) from None
        live.update(progress.render())
    if not console.is_terminal:  # Live leaves its last render without a line end where it cannot redraw
        console.print()
    metric = quality_metric(cfg.task)
    console.print(_summary_table(cfg, result.history))
    # from the first round evaluated (under secure aggregation, round 0 is not: no round's masks hide it yet)
    measured = [record for record in result.history if math.isfinite(record["eval"]["global"][metric])] \
        or result.history
    first, last = measured[0], result.history[-1]["eval"]["global"][metric]
    since = f" (from round {first['round']})" if first["round"] else ""
    chance = f" (chance {1 / len(cfg.data.labels):.3f})" if cfg.task == "classification" else ""
    console.print(f"global {metric}: {first['eval']['global'][metric]:.4f} → {last:.4f}{since}{chance} in "
                  f"{result.seconds:.0f} s")
    console.print(f"results in {output}/: metrics.json, report.png, adapter/ (PeftModel.from_pretrained), run.log"
                  + (", work/ (every round's adapters)" if simulated else ""))
    if reporter:
        console.print(f"metrics pushed to {pushgateway} (job={reporter.job}, federation={cfg.name})"
                      + (f"; {reporter.failures} push(es) failed" if reporter.failures else ""))


@app.command("compile")
@_with_config
def compile_command(
    cfg: FederationConfig,
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the pipeline YAML."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image of the steps (base_image)."),
) -> None:
    """Compile the federation into a KFP pipeline YAML (upload it in the Kubeflow UI)."""
    from kfp.components import load_component_from_file

    from fedfm.components import DEFAULT_IMAGE
    from fedfm.pipelines.federated_finetune import compile_pipeline

    console = _console()
    compile_pipeline(cfg, str(output), image or DEFAULT_IMAGE)
    loaded = load_component_from_file(str(output))  # the YAML must load back with KFP's own loader
    console.print(f"wrote {output}: pipeline {loaded.name!r}, {cfg.rounds} rounds, "
                  f"{len(cfg.training_clients)} client(s), image {image or DEFAULT_IMAGE}")


@app.command("validate")
@_with_config
def validate_command(
    cfg: FederationConfig,
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p", help="A compiled pipeline YAML to check too."),
) -> None:
    """Check a config (and a compiled pipeline) without a cluster: the model, its tokenizer and LoRA's target
    modules, and (run locally) every tenant's data; exit 2 with the reason if anything is wrong."""
    from fedfm.pipelines.local_runner import with_client_state_here
    from fedfm.data import describe_clients
    from fedfm.preflight import check_conversations, check_inputs, check_model, cluster_warnings
    from fedfm.strategies import check_federation

    console = _console()
    # a local run keeps clients' own state in its run directory; any directory checks the same way
    check_federation(with_client_state_here(cfg, Path("run")))
    check_inputs(cfg)
    if cfg.execution.mode == "local" or Path(cfg.model.name_or_path).expanduser().is_dir():
        check_model(cfg)  # in a cluster the tenants' Pods load the model; here only if this machine has it
    # every tenant's rows as a run reads them (a dataset, a column or a tenant's share missing fails here); a
    # cluster's data is in the tenants' Pods
    rows = describe_clients(cfg) if cfg.execution.mode == "local" else None
    if rows is not None:
        check_conversations(cfg)  # what the chat template (or its absence) makes of each tenant's rows
    console.print(f"config: valid — {cfg.task}, {cfg.model.name_or_path}, {len(cfg.training_clients)} client(s), "
                  f"{cfg.rounds} round(s), {cfg.strategy.name}, execution {cfg.execution.mode}")
    if rows is not None:
        console.print("data: " + ", ".join(f"{client} {entry['train']}+{entry['eval']} rows"
                                           for client, entry in rows.items()) + " (train+eval)")
    for warning in cluster_warnings(cfg):
        console.print(f"warning: {warning}", markup=False, highlight=False)
    if cfg.privacy.enabled:
        console.print(_privacy_summary(cfg))
    for warning in cfg.trust_warnings():
        console.print(f"warning: {warning}", markup=False, highlight=False)
    if pipeline is not None:
        from fedfm.pipelines.validate import validate_pipeline

        summary = validate_pipeline(pipeline, cfg)
        console.print(f"pipeline {pipeline}: valid — {summary.name!r}, {summary.rounds} round(s), "
                      f"{summary.clients} client(s), image {summary.image}")


def _privacy_summary(cfg: FederationConfig) -> str:
    from fedfm.trust import privacy

    rounds = privacy.rounds_within_budget(cfg)
    spent = privacy.epsilon(cfg.privacy.accountant, [(privacy.sampling_rate(cfg), privacy.noise_multiplier(cfg))]
                            * rounds, cfg.privacy.delta)
    budget = f" of the budget ε = {cfg.privacy.target_epsilon}" if cfg.privacy.target_epsilon is not None else ""
    stop = f"; the budget pays for {rounds} of {cfg.rounds} rounds" if rounds < cfg.rounds else ""
    return (f"privacy: DP-FedAvg, noise multiplier {privacy.noise_multiplier(cfg):.4g}, clip norm "
            f"{cfg.privacy.clip_norm}, sampling rate {privacy.sampling_rate(cfg)}: ε = {spent:.4g}{budget} at "
            f"δ = {cfg.privacy.delta} after {rounds} round(s){stop}")


@app.command("submit")
@_with_config
def submit_command(
    cfg: FederationConfig,
    host: str = typer.Option(..., "--host", envvar="KFP_HOST", help="The KFP API endpoint (or KFP_HOST)."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image of the steps (base_image)."),
    pipeline_name: Optional[str] = typer.Option(None, "--pipeline-name", help="Default: fedfm-<config name>."),
    experiment: str = typer.Option("fedfm", "--experiment", help="The KFP experiment of the run."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Kubeflow profile namespace (multi-user)."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Default: <config name>-<pipeline hash>."),
    token: Optional[str] = typer.Option(None, "--token", envvar="KFP_TOKEN", help="Bearer token (or KFP_TOKEN)."),
    start_round: int = typer.Option(1, "--start-round", min=1, help="Resume: the first round to run; the rounds "
                                                                    "before are restored from the checkpoints at "
                                                                    "execution.checkpoint_uri."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", min=0.1,
                                          help="Seconds the endpoint has to answer KFP's health check."),
) -> None:
    """Compile the federation and start a run of it on a Kubeflow Pipelines endpoint."""
    from fedfm.components import DEFAULT_IMAGE
    from fedfm.pipelines.submit import submit

    run = submit(cfg, host, image=image or DEFAULT_IMAGE, pipeline_name=pipeline_name, experiment=experiment,
                 namespace=namespace, run_name=run_name, token=token, start_round=start_round,
                 connect_timeout=connect_timeout)
    _console().print(f"run {run.run_id} of pipeline {run.pipeline_id} (version {run.version_id}) started: {run.url}")


# --- the commands a tenant's Job runs (cluster mode) ----------------------------------------------

_JOB_CONFIG_HELP = "Config file; default: the FEDFM_CONFIG environment variable (what the operator sets)."


def _job_config(config: Optional[Path], client: str, data: Optional[str], world_size: Optional[int] = None):
    """The config of a tenant's Job: the round's config, with this client reading ``data``."""
    import json
    import os

    from fedfm.errors import ConfigError

    if config is not None:
        cfg = load_config(config)
    elif os.environ.get("FEDFM_CONFIG"):
        try:
            raw = json.loads(os.environ["FEDFM_CONFIG"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"FEDFM_CONFIG is not valid JSON: {exc}") from None
        cfg = FederationConfig.parse(raw, source="FEDFM_CONFIG")
    else:
        raise ConfigError("no config: pass --config or set FEDFM_CONFIG")
    own = cfg.client(client).model_dump(mode="json", exclude_none=True)  # the round's config must be for this client
    data_dict = cfg.as_dict()
    data_dict["clients"] = [{**own, **({"train": data} if data else {})}]
    if world_size:
        data_dict["training"]["world_size"] = world_size
    return FederationConfig.parse(data_dict, source="the Job's config")


@app.command("client-train")
def client_train(
    client: str = typer.Option(..., help="This client's name."),
    round_index: int = typer.Option(..., "--round", help="The round."),
    global_adapter: str = typer.Option(..., help="URI of the global adapter to start from."),
    output: str = typer.Option(..., help="URI to write the update to."),
    data: Optional[str] = typer.Option(None, help="This client's training data (file, URI or HF id)."),
    world_size: Optional[int] = typer.Option(None, help="DeepSpeed processes (GPUs) for this fine-tune."),
    config: Optional[Path] = typer.Option(None, "--config", help=_JOB_CONFIG_HELP),
) -> None:
    """One client's fine-tune for one round: what a ClientRound's Job runs in the tenant's namespace."""
    from fedfm.training import train_client

    cfg = _job_config(config, client, data, world_size)
    result = train_client(cfg, client, round_index, global_adapter, output)
    if result is None:
        _console().print(f"client {client}, round {round_index}: this node's ranks trained; the first node writes "
                         "the update")
        return
    _console().print(f"client {client}, round {round_index}: {result.steps} steps on {result.samples} samples, "
                     f"train loss {result.train_loss:.4f}; update written to {output}")


@app.command("client-secagg")
def client_secagg(
    client: str = typer.Option(..., help="This client's name."),
    round_index: int = typer.Option(..., "--round", help="The round."),
    step: str = typer.Option(..., help="The protocol step: advertise, share, train, confirm or reveal."),
    inputs: list[str] = typer.Option([], "--input", help="NAME=VALUE, the step's inputs (URIs, numbers)."),
    output: str = typer.Option(..., help="URI to write the step's message to."),
    data: Optional[str] = typer.Option(None, help="This client's training data (the train step)."),
    world_size: Optional[int] = typer.Option(None, help="DeepSpeed processes (GPUs) for the train step."),
    config: Optional[Path] = typer.Option(None, "--config", help=_JOB_CONFIG_HELP),
) -> None:
    """One of this client's secure-aggregation steps for one round (a ClientRound's Job runs it): its keys
    and plain update stay in its own state location; only protocol messages go to ``output``."""
    from fedfm.errors import ConfigError
    from fedfm.trust.secure_round import client_step

    named = dict(item.partition("=")[::2] for item in inputs)
    if any(not name for name in named):
        raise ConfigError(f"--input takes NAME=VALUE, not {inputs}")
    cfg = _job_config(config, client, data, world_size)
    client_step(cfg, client, round_index, step, named, output)
    _console().print(f"client {client}, round {round_index}: secure aggregation step {step} written to {output}")


@app.command("keygen")
def keygen(
    client: str = typer.Option(..., help="The tenant's client name in the federation."),
    state: str = typer.Option(..., help="The tenant's state location (its FederatedClient's spec.state URI), "
                                        "where only the tenant can read: the private half is written there."),
) -> None:
    """Create a tenant's signing key for secure aggregation (run by the tenant): the private half goes into its
    state location, and the public half, printed, goes into its FederatedClient's spec.signingKey. An existing
    key is never overwritten."""
    from fedfm.trust.signing import create_identity

    public = create_identity(client, state.rstrip("/"))
    _console().print(f"client {client}: signing key written to {state.rstrip('/')}/identity.json; register its "
                     f"public half in the FederatedClient:\n  spec:\n    signingKey: {public}")


@app.command("storage-policy")
def storage_policy(
    config: Path = typer.Option(..., "--config", "-c", help="The federation's config (YAML or JSON).",
                                exists=True, dir_okay=False),
    client: str = typer.Option(..., help="The tenant's client name in the federation."),
) -> None:
    """Print the IAM policy of a tenant's own credential to the federation's S3-compatible storage (run by the
    platform admin): read the published adapters, read and write the tenant's prefix, nothing else. Give it to
    a user of the store (AWS IAM, `mc admin policy create` for MinIO), put that user's keys in a Secret in the
    tenant's namespace, and name the Secret in the FederatedClient's spec.federationStorage.secretRef."""
    from fedfm.errors import ConfigError
    from fedfm.trust.grants import tenant_policy

    cfg = load_config(config)
    if not cfg.execution.storage_uri:
        raise ConfigError(f"{config} names no execution.storage_uri: the federation's storage is what the policy "
                          "is about")
    cfg.client(client)  # a client the federation has
    typer.echo(json.dumps(tenant_policy(cfg.execution.storage_uri, cfg.name, client), indent=2))


@app.command("client-evaluate")
def client_evaluate(
    client: str = typer.Option(..., help="This client's name."),
    round_index: int = typer.Option(..., "--round", help="The round."),
    adapter: str = typer.Option(..., help="URI of the adapter to evaluate."),
    output: str = typer.Option(..., help="URI to write the evaluation counts (JSON) to."),
    data: Optional[str] = typer.Option(None, help="This client's data (its evaluation split is scored)."),
    config: Optional[Path] = typer.Option(None, "--config", help=_JOB_CONFIG_HELP),
) -> None:
    """Score an adapter on this client's evaluation split; only the counts leave the namespace."""
    import json

    from fedfm import storage
    from fedfm.evaluation import evaluate_clients

    cfg = _job_config(config, client, data)
    sums = evaluate_clients(cfg, adapter, [client])[client]
    storage.write_bytes(output, json.dumps(sums.answer(cfg.task)).encode())
    _console().print(f"client {client}, round {round_index}: {sums.metrics(cfg.task)}")


class RunProgress:
    """What the run display shows, kept up to date from the steps' events."""

    def __init__(self, cfg: FederationConfig):
        self.cfg = cfg
        self.metric = quality_metric(cfg.task)
        self.init = "…"
        self.rounds: dict[int, dict[str, Any]] = {
            index: {"clients": {}, "aggregate": "", "eval": ""} for index in range(0, cfg.rounds + 1)
        }

    def update(self, event: dict[str, Any]) -> str | None:
        """Apply ``event``; return a one-line description of finished or failed steps."""
        kind, step = event["event"], event.get("step", event["event"])
        round_state = self.rounds.get(event.get("round", 0), self.rounds[0])
        if kind == "failed":
            text = f"failed: {event['error']}"
        elif kind == "retry":  # below the quorum: fresh clients drawn for the missing ones
            text = f"{event['short']} short of the quorum; attempt {event['attempt']}: {', '.join(event['clients'])}"
        elif step == "client_finetune" and kind == "finished" and "train_loss" not in event:
            text = f"{event.get('phase', 'no update')}: {event.get('reason', '')}"  # failed, or past the deadline
        elif step == "client_finetune":
            text = "training" if kind == "started" else f"loss {event['train_loss']:.3f}"
        elif step == "evaluate":
            text = "evaluating" if kind == "started" else f"{event[self.metric]:.4f} (loss {event['loss']:.3f})"
        else:
            text = "running" if kind == "started" else "done"
        if step == "client_finetune":
            round_state["clients"][event["client"]] = text
        elif step == "aggregate":
            round_state["aggregate"] = text
        elif step == "evaluate":
            round_state["eval"] = text
        elif step == "init":
            self.init = text
        if kind == "started":
            return None
        where = " ".join(str(part) for part in (f"round {event['round']}" if "round" in event else "",
                                                 event.get("client", "")) if part)
        return f"{step}{f' [{where}]' if where else ''}: {text}"

    def render(self) -> Table:
        clients = self.cfg.training_clients
        per_client = len(clients) <= 8
        table = Table(title=f"init: {self.init}", title_justify="left")
        table.add_column("round", justify="right")
        for client in clients if per_client else ["clients"]:
            table.add_column(client)
        table.add_column("aggregate")
        table.add_column(f"global {self.metric}")
        for index, state in self.rounds.items():
            if per_client:
                cells = [state["clients"].get(client, "" if index == 0 else "·") for client in clients]
            else:
                done = sum(1 for text in state["clients"].values() if text.startswith("loss"))
                cells = [f"{done}/{len(clients)}" if index else ""]
            table.add_row(str(index), *cells, state["aggregate"], state["eval"])
        return table


def _tenant_table(cfg: FederationConfig, described: dict[str, dict]) -> Table:
    table = Table(title="tenants", title_justify="left")
    table.add_column("client")
    table.add_column("train", justify="right")
    table.add_column("eval", justify="right")
    if cfg.task == "classification":
        table.add_column("labels (train)")
    for client, info in described.items():
        row = [client, str(info["train"]), str(info["eval"])]
        if cfg.task == "classification":
            row.append(" ".join(f"{label}:{count}" for label, count in info["labels"].items()))
        table.add_row(*row)
    return table


def _last_checkpoint(cfg: FederationConfig) -> int | None:
    """The last round a run checkpointed (None: none): a resumed run goes on from the next one."""
    from fedfm import checkpoint

    return checkpoint.latest_round(cfg.execution.checkpoint_uri) if cfg.execution.checkpoint_uri else None


def _resuming(cfg: FederationConfig, output: Path) -> str:
    last = _last_checkpoint(cfg)
    if last is None:
        return f"resuming {output}: no round finished before it stopped; it starts again from round 0"
    return f"resuming {output}: {_rounds_finished(last)} (checkpointed); it restarts from round {last + 1}"


def _rounds_finished(last: int) -> str:
    return "round 0 finished" if last == 0 else f"rounds 0-{last} finished"


@app.command("status")
def status_command(
    run_dir: Path = typer.Argument(..., help="A run's directory (what fedfm run or fedfm simulate writes).",
                                   exists=True, file_okay=False),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing progress until the run ends "
                                                              "(Ctrl-C stops following, not the run)."),
) -> None:
    """Show a run's progress from its events.jsonl, one line per finished step, and how it ended: its
    summary, or how to resume it."""
    from fedfm import events
    from fedfm.pipelines.local_runner import RUN_RECORD, run_config

    cfg = run_config(run_dir)
    progress, console, offset = RunProgress(cfg), _console(), 0
    finished = run_dir / "metrics.json"
    try:
        while True:
            done = finished.exists()  # before reading: the run's last events are written before its metrics
            batch, offset = events.read(run_dir / "events.jsonl", offset)
            for event in batch:
                line = progress.update(event)
                if line:
                    console.print(line, markup=False, highlight=False)
            if done or not follow:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if finished.exists():
        console.print(_summary_table(cfg, json.loads(finished.read_text())["rounds"]))
        console.print(f"finished: results in {run_dir}/")
        return
    runner = json.loads((run_dir / RUN_RECORD).read_text()).get("runner")
    command = "fedfm simulate" if runner == "simulate" else "fedfm run"
    last = _last_checkpoint(cfg)
    done = "no round finished yet" if last is None else _rounds_finished(last)
    console.print(f"not finished: {done}; if it is no longer running, `{command} --resume {run_dir}` goes on from "
                  f"round {0 if last is None else last + 1}", highlight=False)


def _summary_table(cfg: FederationConfig, history: list[dict[str, Any]]) -> Table:
    metric = quality_metric(cfg.task)
    table = Table(title="summary", title_justify="left")
    for column in ("round", f"global {metric}", "eval loss", "train loss", "clients", "up", "down", "round s"):
        table.add_column(column, justify="right")
    for record in history:
        evaluation = record["eval"]["global"]
        table.add_row(
            str(record["round"]), f"{evaluation[metric]:.4f}", f"{evaluation['loss']:.4f}",
            f"{record['train_loss']:.4f}" if "train_loss" in record else "",
            str(len(record["clients"])) if record["clients"] else "",
            _size(record["bytes_up"]), _size(record["bytes_down"]),
            f"{record['round_seconds']:.1f}" if "round_seconds" in record else "",
        )
    return table


def _size(count: float) -> str:
    if not count:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            break
        count /= 1024
    return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"


def main() -> None:
    try:
        from fedfm.storage import credentials_from_files

        credentials_from_files()
        app()
    except FedFMError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
