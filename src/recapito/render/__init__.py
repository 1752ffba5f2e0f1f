"""Rendering: sandboxed Jinja2 templates to MIME messages."""

from recapito.render.template import CompiledTemplate, RenderedMessage, load_template

__all__ = ["CompiledTemplate", "RenderedMessage", "load_template"]
