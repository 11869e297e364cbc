"""runtime/binding.py's KeptBinding against a plain ``InferenceSession.run`` on the same feeds: the outputs it
returns are the graph's (logits equal), a buffer's output is the very OrtValue fed as its past (written in place), and
each run returns a fresh logits value; the public ``get_outputs()`` path (an onnxruntime without
``IOBinding._iobinding``) returns the same."""

import numpy as np

from require import need_ep
from solm_compile.bench.sessions import prefill_feeds
from solm_compile.runtime import ep
from solm_compile.runtime.session import SolmSession


class _Public:
    """An IOBinding seen through its public methods only (no ``_iobinding``)."""

    def __init__(self, binding):
        self._b = binding

    def __getattr__(self, name):
        if name == "_iobinding":
            raise AttributeError(name)
        return getattr(self._b, name)


def test_kept_binding_returns_the_graphs_outputs_and_the_buffers_themselves(step_artifacts):
    need_ep(ep.library_path() is not None)
    sess = SolmSession(step_artifacts["fixed"], threads=1, tokenizer=False)
    feeds = prefill_feeds(sess, [3, 5, 7, 11, 13, 17], capacity=32)
    plain = {k: np.array(v.numpy() if hasattr(v, "numpy") else v) for k, v in feeds.items()}   # its own copy
    want = dict(zip(sess.output_names, sess.sess.run(None, plain)))
    b = sess._binding
    got = b.run(feeds)
    assert list(got) == sess.output_names
    np.testing.assert_array_equal(got["logits"].numpy(), want["logits"])
    assert sess._alias, "the fixed artifact writes its KV cache in place"
    for present, past in sess._alias.items():
        assert got[present] is feeds[past]                                 # the buffer itself, written in place
        if got[present].shape()[2] == 32:                                  # a KV cache [B, Hkv, C, d]: its 6 rows
            np.testing.assert_array_equal(got[present].numpy()[:, :, :6], want[present][:, :, :6])

    binding = b._local.last[2]
    public = b._outputs(_Public(binding), feeds)                           # get_outputs(): every output wrapped
    assert list(public) == list(got)
    for name in got:
        np.testing.assert_array_equal(public[name].numpy(), got[name].numpy())

    first, kept = got["logits"], got["logits"].numpy().copy()
    sess._carry(got, feeds)
    feeds["input_ids"], feeds["position_ids"] = np.asarray([[19]]), np.asarray([[6]])
    again = b.run(feeds)
    assert again["logits"] is not first                                    # a fresh value each run
    np.testing.assert_array_equal(first.numpy(), kept)                     # not overwritten by the next run
    assert not np.array_equal(again["logits"].numpy(), kept)
