"""--help for every stage: each dataclass field's help is the string literal right under it (cleanrl style),
read from the source; HfArgumentParser itself only shows field(metadata={"help": ...}), which TRL's own
configs use. utils.parse_args calls this only when --help / -h is on the command line."""

import ast
import inspect
import textwrap
import types
from dataclasses import fields


def attach_docstrings(*dataclass_types) -> None:
    for cls in dataclass_types:
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        except (OSError, TypeError):
            continue  # no source: TRL's configs carry their own help
        by_name = {f.name: f for f in fields(cls)}
        for stmt, doc in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                f = by_name.get(getattr(stmt.target, "id", None))
                if f is not None:
                    f.metadata = types.MappingProxyType({"help": " ".join(str(doc.value.value).split()), **f.metadata})
