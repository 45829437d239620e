"""mosel: SLO-aware serving of multi-modal PyTorch models by dynamic modality selection.

Decorate a model, profile it, serve it::

    @mosel.multimodal
    class AV(nn.Module):
        @mosel.modality("audio")
        def encode_audio(self, audio): ...
        @mosel.modality("video")
        def encode_video(self, video): ...
        @mosel.fusion
        def fuse(self, features): ...

    model = AV().eval()
    mosel.profile(model, val_batches)
    result = model.infer({"audio": a, "video": v}, deadline_ms=40.0, min_accuracy=0.72)
"""

from mosel._version import __version__
from mosel.compiling import compile_branches, compiled_parts
from mosel.drift import AccuracySnapshot, Alarm, ConfigurationAccuracy, ModalityAccuracy
from mosel.errors import (
    AccuracyUnreachableError,
    DeadlineError,
    ExecutionError,
    InfeasibleError,
    InputError,
    MoselError,
    MoselWarning,
    NotMonitoredError,
    NotProfiledError,
    OutputError,
    ProfileError,
    ProfileMismatchError,
    QueueFullError,
    ReplicaError,
    ShutdownError,
    SLOError,
    SpecError,
)
from mosel.escalation import Calibration, Chain, RowSample
from mosel.execution import Result
from mosel.machine import Stalls
from mosel.monitoring import Monitoring
from mosel.plan import CostModel, Frontier, Plan, PlannerConfig, Strategy
from mosel.profiler import profile, top1
from mosel.profiles import CostCheck, Fingerprint, LatencyTable, Profile
from mosel.routing import PowerOfTwoRouter, RandomRouter, Router, RouteRequest, SlackRouter
from mosel.runtime import (
    attach,
    close,
    feedback,
    label_as,
    load,
    monitor,
    profile_of,
    run_configuration,
    serving,
    stats,
)
from mosel.scheduler import SchedulerConfig
from mosel.simulate import Arrival, ClusterSimulation, Simulation, simulate, simulate_replicas
from mosel.spec import ModelSpec, Padding, confidence, fusion, modality, multimodal, spec_of
from mosel.stats import Load, StatsSnapshot
from mosel.tail import Residuals
from mosel.training import train_with_modality_dropout

__all__ = [
    "AccuracySnapshot",
    "AccuracyUnreachableError",
    "Alarm",
    "Arrival",
    "Calibration",
    "Chain",
    "ClusterSimulation",
    "ConfigurationAccuracy",
    "CostCheck",
    "CostModel",
    "DeadlineError",
    "ExecutionError",
    "Fingerprint",
    "Frontier",
    "InfeasibleError",
    "InputError",
    "LatencyTable",
    "Load",
    "ModalityAccuracy",
    "ModelSpec",
    "Monitoring",
    "MoselError",
    "MoselWarning",
    "NotMonitoredError",
    "NotProfiledError",
    "OutputError",
    "Padding",
    "Plan",
    "PlannerConfig",
    "PowerOfTwoRouter",
    "Profile",
    "ProfileError",
    "ProfileMismatchError",
    "QueueFullError",
    "RandomRouter",
    "ReplicaError",
    "Residuals",
    "Result",
    "RowSample",
    "RouteRequest",
    "Router",
    "SLOError",
    "SchedulerConfig",
    "ShutdownError",
    "Simulation",
    "SlackRouter",
    "SpecError",
    "Stalls",
    "StatsSnapshot",
    "Strategy",
    "__version__",
    "attach",
    "close",
    "compile_branches",
    "compiled_parts",
    "confidence",
    "feedback",
    "fusion",
    "label_as",
    "load",
    "modality",
    "monitor",
    "multimodal",
    "profile",
    "profile_of",
    "run_configuration",
    "serving",
    "simulate",
    "simulate_replicas",
    "spec_of",
    "stats",
    "top1",
    "train_with_modality_dropout",
]
