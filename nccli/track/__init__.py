"""Neural collapse measured during training: :class:`Tracker` (``nccli.Tracker``).

:mod:`nccli.track.tracker` holds the tracker (``observe``, ``collect``, ``frame``,
``measure``), :mod:`nccli.track.batches` the loader contract and the model-state guard,
:mod:`nccli.track.dist` the merge across ``torch.distributed`` ranks.  The run file it
writes is :mod:`nccli.io.cache.run`'s.
"""

from nccli.track.tracker import Collector, Tracker

__all__ = ["Collector", "Tracker"]
