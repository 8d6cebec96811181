"""Field docstrings: the string literal right after a class attribute documents it.

Configs (common/config/) and wire records (common/messages.py) document every field this way, and
their references (docs/config.md, docs/wire-protocol.md) are generated from it, so nothing is
written twice.
"""

from __future__ import annotations

import ast
import inspect
import textwrap


def field_docs(cls: type) -> dict[str, str]:
    """Map each annotated attribute of `cls` to the string literal that follows it in the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
