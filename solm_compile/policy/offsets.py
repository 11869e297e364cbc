"""Per-layer-group deviations from the static floor (issue 18; design in docs/policy.md).

Instead of one joint (κ, ρ, b) shared by every layer, the policy picks, per step and row, an *offset* for each
layer group g ∈ {early, middle, late} and each axis a ∈ {κ, ρ} from a short list ``offsets`` (0 first), and the
layer's control is the floor's keep for that layer plus its group's offset::

    floor   [L, 2]       per-layer (κ_l, ρ_l) of the strongest static allocation at the target (ū_κ, ū_ρ)
    choice  [N, G, 2]    index into ``offsets`` per row, group and axis
    keep    [N, L, 2]  = clamp(floor[l] + offsets[choice[:, group(l)]], lowest, 1)

The distribution is factored: logits [N, G, 2, O] are independent categoricals per (group, axis), so
log π(choice) is a sum of G·2 terms and the greedy choice is the argmax of each. ``prior`` nats are added to
offset 0's logit: a policy head that outputs nothing (zero weights, or an uninformative hidden state) is the
floor, exactly, under greedy decoding, and near it when sampled.

Pure tensor functions; the torch evaluation engine runs them through ``eval.offsets.OffsetController`` (per-layer
controls [N, L, 3]). The artifact still takes one shared action per row (docs/policy.md says what it needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from solm_compile.errors import UserError

GROUP_NAMES = ("early", "middle", "late")


def layer_groups(num_layers: int, groups: int = 3) -> Tensor:
    """[L] long: the group of each layer, g(l) = ⌊l·G/L⌋: contiguous blocks whose sizes differ by at most one."""
    if num_layers < 1 or not 1 <= groups <= num_layers:
        raise UserError(f"layer groups: need 1 <= groups ({groups}) <= layers ({num_layers})")
    return torch.arange(num_layers) * groups // num_layers                       # [L]


@dataclass(frozen=True)
class OffsetGrid:
    """The offsets a group may take on each axis (keep units, 0 first), the number of groups and offset 0's prior."""

    offsets: tuple[float, ...] = (0.0, -0.25, -0.125, 0.125, 0.25)
    groups: int = 3
    prior: float = 2.0
    lowest: tuple[float, float] = (0.125, 0.3)     # the keeps a deviation may not go under (κ, ρ): the grid's lowest

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"offset grid: {msg}")

        offs = tuple(float(o) for o in self.offsets)
        check(len(offs) >= 1 and offs[0] == 0.0, f"offsets must start with 0 (the floor), got {list(offs)}")
        check(len(set(offs)) == len(offs), f"offsets must be distinct, got {list(offs)}")
        check(all(-1.0 < o < 1.0 for o in offs), f"offsets must be in (-1, 1), got {list(offs)}")
        check(isinstance(self.groups, int) and self.groups >= 1, f"groups must be an integer >= 1, got {self.groups!r}")
        check(self.prior >= 0, f"prior must be >= 0, got {self.prior}")
        low = tuple(float(v) for v in self.lowest)
        check(len(low) == 2 and all(0.0 < v <= 1.0 for v in low), f"lowest must be 2 keeps in (0, 1], got {low}")
        object.__setattr__(self, "offsets", offs)
        object.__setattr__(self, "lowest", low)

    @property
    def num_choices(self) -> int:
        return len(self.offsets)

    @property
    def num_logits(self) -> int:
        """What a policy head outputs per step: G · 2 · O."""
        return self.groups * 2 * self.num_choices

    def prior_bias(self) -> Tensor:
        """[O]: ``prior`` on offset 0, 0 elsewhere."""
        b = torch.zeros(self.num_choices)
        b[0] = self.prior
        return b

    def logits(self, head: Tensor) -> Tensor:
        """A head's raw output [..., G·2·O] -> factored logits [..., G, 2, O] with the prior on offset 0."""
        shape = head.shape[:-1] + (self.groups, 2, self.num_choices)
        return head.reshape(shape) + self.prior_bias().to(head.device)             # [..., G, 2, O]

    def keeps(self, floor: Tensor, choice: Tensor) -> Tensor:
        """Per-layer keeps: floor [L, 2] or [N, L, 2], choice [N, G, 2] long -> [N, L, 2] (module docstring)."""
        L = floor.shape[-2]
        g = layer_groups(L, self.groups).to(choice.device)                        # [L]
        off = torch.tensor(self.offsets, device=choice.device)[choice]           # [N, G, 2]
        per_layer = off[:, g]                                                     # [N, L, 2]
        lo = torch.tensor(self.lowest, device=choice.device)                      # [2]
        return torch.minimum(torch.maximum(floor + per_layer, lo), torch.ones_like(lo))   # [N, L, 2]


def greedy(logits: Tensor) -> Tensor:
    """[..., G, 2, O] -> the argmax choice per (group, axis) [..., G, 2] (ties: the lower index, offset 0 first)."""
    return logits.argmax(-1)


def sample(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """[N, G, 2, O] -> one independent draw per (row, group, axis) [N, G, 2]."""
    N, G, A, O = logits.shape
    p = torch.softmax(logits.reshape(N * G * A, O), -1)                           # [N·G·2, O]
    return torch.multinomial(p, 1, generator=generator).view(N, G, A)             # [N, G, 2]


def log_prob(logits: Tensor, choice: Tensor) -> Tensor:
    """log π(choice) of the factored distribution: [..., G, 2, O], [..., G, 2] -> [...] (a sum over G·2)."""
    lp = F.log_softmax(logits, -1).gather(-1, choice[..., None])[..., 0]         # [..., G, 2]
    return lp.sum((-2, -1))                                                       # [...]


def entropy(logits: Tensor) -> Tensor:
    """Entropy of the factored distribution (the sum of its G·2 categoricals): [..., G, 2, O] -> [...]."""
    lp = F.log_softmax(logits, -1)
    return -(lp.exp() * lp).sum(-1).sum((-2, -1))                                 # [...]
