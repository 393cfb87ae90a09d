"""What the Python plugins share besides JSON: Rust's idea of whitespace,
and reading settings the way the Rust SDK's `config::parse` does."""

from componentize_py_types import Err
from serde_json_compat import JsonError, Reader
from wit_world.imports import config
from wit_world.imports.types import PluginError_BadConfig

# Rust's `str::trim` removes Unicode White_Space, which is not Python's
# `str.isspace` (that also takes U+001C..U+001F).
RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def read_settings(text, fields, optional, defaulted):
    """The settings struct as a dict (see `Reader.de_struct`); `fields` takes
    the reader and gives each field's reader. Bad settings are a bad-config
    error."""
    r = Reader(text.encode("utf-8"))
    try:
        out = r.de_struct(fields(r), optional=optional, defaulted=defaulted)
        r.end()
    except JsonError as e:
        raise Err(PluginError_BadConfig(str(e))) from None
    return out


def cached_settings(parse):
    """`parse` applied once to the settings, its result or its error kept:
    an instance serves one rule for its life."""
    cache = []

    def get():
        if not cache:
            try:
                cache.append(parse(config.get_json()))
            except Err as e:
                cache.append(e)
        if isinstance(cache[0], Err):
            raise Err(cache[0].value)
        return cache[0]

    return get
