"""The Data tab's preview as HTML: an example as the model sees it, roles coloured, trained tokens highlighted.

render.py says which text is which role and which tokens are trained; this module only draws it.
"""

from __future__ import annotations

import html

from ..render import Rendered, pieces

ROLE_COLOURS = {
    "system": "#7c3aed",
    "user": "#2563eb",
    "assistant": "#15803d",
    "tool": "#c2410c",
    "text": "inherit",
}
LEGEND_ROLES = ("system", "user", "assistant", "tool")
TRAINED_BACKGROUND = "rgba(250,204,21,.45)"


def to_html(rendered: Rendered) -> str:
    """The rendered text as HTML: roles coloured, trained tokens highlighted, with a legend."""
    body = []
    for text, role, trained in pieces(rendered):
        style = f"color:{ROLE_COLOURS.get(role, 'inherit')}"
        escaped = html.escape(text)
        if trained:
            body.append(f'<mark class="sft-trained" style="{style};background:{TRAINED_BACKGROUND};'
                        f'border-radius:2px;padding:0">{escaped}</mark>')
        else:
            body.append(f'<span class="sft-role-{html.escape(role)}" style="{style}">{escaped}</span>')
    legend = " ".join(f'<span style="color:{ROLE_COLOURS[role]}">■ {role}</span>' for role in LEGEND_ROLES)
    return (
        '<div class="sft-render">'
        f'<div class="sft-legend" style="font-size:.85em;margin-bottom:.4em">{legend} '
        f'<mark style="background:{TRAINED_BACKGROUND}">trained</mark> '
        f"· {rendered.n_tokens} tokens, {rendered.n_trained} trained</div>"
        '<pre style="white-space:pre-wrap;word-break:break-word;margin:0;font-size:.9em">'
        + "".join(body)
        + "</pre></div>"
    )
