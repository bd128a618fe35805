"""One module per tab of the app, each with its handlers and one `build(context)` that creates the
tab's widgets and wires its events; `common.TabContext` is what they all receive."""

from . import batch, caption, chat, explain, model, retrieval
from .common import TabContext

# In the order the tabs appear.
TABS = (caption, chat, batch, retrieval, explain, model)

__all__ = ["TABS", "TabContext", "batch", "caption", "chat", "explain", "model", "retrieval"]
