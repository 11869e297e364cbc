"""``torch.compile(model, backend="solm")``: the same passes and policy step inside PyTorch."""

from solm_compile.backend.dynamo import solm_backend

__all__ = ["solm_backend"]
