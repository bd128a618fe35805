"""One module per tab of the app, each with its handlers and one `build(context)` that creates the
tab's widgets and wires its events; `common.TabContext` is what they all receive."""

from . import caption, chat, model, retrieval
from .common import TabContext

# In the order the tabs appear.
TABS = (caption, chat, retrieval, model)

__all__ = ["TABS", "TabContext", "caption", "chat", "model", "retrieval"]
