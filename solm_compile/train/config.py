"""``TrainConfig``: every training setting, validated once; ``solm train``'s flags and defaults are built from it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from solm_compile.errors import UserError
from solm_compile.policy.actions import ActionGrid
from solm_compile.policy.network import PolicyConfig
from solm_compile.policy.step import EPISODE_LEN
from solm_compile.train import grpo

REWARDS = ("ll", "kl")
POLICY_KINDS = ("joint", "offsets")   # one joint action per step (SOL's), or offsets over the floor (docs/policy.md)
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"          # the checkpoint that scored best on the validation blocks (solm train ships it)
METRICS = "metrics.jsonl"
# fields that may change between a run and its resume: its length, the optimisation schedule and the weights of
# the objective's terms (a curriculum: budget penalty, entropy bonus); the rollout distribution, reward kind and
# model stay fixed
_RESUMABLE = ("updates", "checkpoint_every", "lr", "grad_accum", "minibatch_decisions", "ppo_epochs", "alpha",
              "entropy_coef")


@dataclass(frozen=True)
class TrainConfig:
    """GRPO training settings (SOL defaults, CPU-sized: ctx 256, T 16, K 8, B 2); ``solm train``'s flags and their
    defaults are built from these fields, so the CLI and the Python API train the same thing."""

    ctx: int = 256
    T: int = EPISODE_LEN
    K: int = 8
    B: int = 2
    reward: str = "kl"                  # what the shipped policy was trained with (SOL: ll)
    seed: int = 1234
    updates: int = 300
    checkpoint_every: int = 5
    buffer_decisions: int = 2048
    minibatch_decisions: int = 512
    grad_accum: int = 0                 # minibatches per optimiser step; 0 = the whole buffer
    ppo_epochs: int = 1                 # passes over each buffer (SOL: 1; more reuse costly CPU rollouts)
    tau: float = 1.3
    gamma: float = grpo.GAMMA
    dead_zone: float = grpo.DEAD_ZONE
    alpha: tuple[float, float, float] = grpo.ALPHA
    clip: float = 0.2
    entropy_coef: float = 0.05
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    grid: ActionGrid = field(default_factory=ActionGrid)
    policy_kind: str = "joint"
    floor: str = "uniform"              # offsets: the floor they deviate from: "uniform" or "layers:<file sha256>"
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"train config: {msg}")

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("ctx", "T", "B", "updates", "checkpoint_every", "buffer_decisions", "minibatch_decisions",
                     "ppo_epochs"):
            v = getattr(self, name)
            check(whole(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(whole(self.K) and self.K >= 2, f"K must be >= 2 (the group baseline needs 2 rollouts), got {self.K!r}")
        check(whole(self.grad_accum) and self.grad_accum >= 0, f"grad_accum must be >= 0, got {self.grad_accum!r}")
        check(self.reward in REWARDS, f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        check(self.minibatch_decisions >= self.T,
              f"minibatch_decisions ({self.minibatch_decisions}) must hold one episode (T={self.T})")
        check(self.policy_kind in POLICY_KINDS,
              f"policy_kind must be one of {', '.join(POLICY_KINDS)}, got {self.policy_kind!r}")
        check(self.floor == "uniform" or (self.floor.startswith("layers:") and len(self.floor) > 7),
              f"floor must be 'uniform' or 'layers:<sha256>', got {self.floor!r}")
        check(self.floor == "uniform" or self.policy_kind == "offsets",
              f"a floor ({self.floor}) is what offsets deviate from: it needs policy_kind 'offsets'")
        check(self.tau > 0, f"tau must be > 0, got {self.tau}")
        check(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        check(self.dead_zone >= 0, f"dead_zone must be >= 0, got {self.dead_zone}")
        check(len(self.alpha) == 3 and all(a >= 0 for a in self.alpha),
              f"alpha must be 3 numbers >= 0, got {self.alpha}")
        check(0 < self.clip < 1, f"clip must be in (0, 1), got {self.clip}")
        check(self.entropy_coef >= 0, f"entropy_coef must be >= 0, got {self.entropy_coef}")
        check(self.lr > 0 and self.grad_clip > 0, f"lr and grad_clip must be > 0, got {self.lr}, {self.grad_clip}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(isinstance(self.grid, ActionGrid), f"grid must be an ActionGrid, got {type(self.grid).__name__}")
        check(isinstance(self.policy, PolicyConfig), f"policy must be a PolicyConfig, got {type(self.policy).__name__}")
        check(self.T <= self.policy.max_steps,
              f"T ({self.T}) exceeds the policy's position table (max_steps {self.policy.max_steps})")
        object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["alpha"] = list(self.alpha)
        d["grid"], d["policy"] = self.grid.to_dict(), self.policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"train config: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        if "grid" in d:
            d["grid"] = ActionGrid.from_dict(dict(d["grid"]))
        if "policy" in d:
            d["policy"] = PolicyConfig.from_dict(dict(d["policy"]))
        if "alpha" in d:
            d["alpha"] = tuple(d["alpha"])
        return cls(**d)
