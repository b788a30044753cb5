"""Template helpers of the web pages."""
from __future__ import annotations

from django import template
from django.urls import reverse
from django.utils.safestring import mark_safe
from markdown_it import MarkdownIt

register = template.Library()

# html=False: raw HTML in a description or README is shown as text, never rendered, so a
# model card cannot inject markup or scripts; markdown-it also refuses javascript:/data: links.
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table").enable("strikethrough")


@register.filter
def markdown(text: str) -> str:
    return mark_safe(_markdown.render(text or ""))


@register.filter
def matched_summary(matched: dict | None) -> str:
    """'description 0.62 · keywords' — which rankings found a search hit, with their similarity."""
    if not matched:
        return ""
    # Keyword text ranks are not similarities on a common scale: only the ranking is named.
    return " · ".join(ranking if ranking == "keywords" else f"{ranking} {value:.2f}" for ranking, value in matched.items())


@register.filter
def percent(fraction: float) -> str:
    return f"{100 * (fraction or 0):.0f}%"


@register.filter
def short_hash(value: str, length: int = 12) -> str:
    return (value or "")[:length]


@register.filter
def adapter_url(full_name: str) -> str:
    """The web page of an adapter named namespace/name (as provenance records parents)."""
    namespace, _, name = full_name.partition("/")
    return reverse("frontend:adapter", args=[namespace, name])
