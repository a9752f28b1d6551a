"""Human feedback in the browser: `diffalign label DIR` serves a page for the feedback set in DIR
(a D3PO round, a KTO set or DPO candidates) and writes, answer by answer, the file the trainer
reads. `sets` holds the kinds of set and their files, `server` the HTTP server, `page.html` the page."""

from .server import LabelServer, make_server
from .sets import FeedbackSet, LabelSetError, open_set

__all__ = ["FeedbackSet", "LabelServer", "LabelSetError", "make_server", "open_set"]
