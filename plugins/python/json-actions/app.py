"""Postprocessor: turns a model completion into validated actions (Python
port of the Rust plugin plugins/json-actions, same results).

The completion must hold one JSON value: `{"actions": [...]}`, a list of
actions, or one action. Prose or a Markdown code fence around the JSON is
ignored. Actions:
- `{"type":"alert","level":"warning","text":"...","device":"m1"}`
- `{"type":"publish","topic":"...","payload":{...},"qos":1,"retain":false}`
  (a text payload is sent as it is, any other JSON value as JSON text)
- `{"type":"command","device":"lamp-1","command":"set","value":21.5}`

A missing `device` is the window's device. Anything else is a
`bad-completion` error that says what is wrong; nothing is guessed.

Settings: max_actions (default 16). Unknown settings are a bad-config error.
"""

from componentize_py_types import Err
from plugin_settings import RUST_WHITESPACE, cached_settings, read_settings
from serde_json_compat import JsonError, Num, Reader, write_value
from wit_world import exports
from wit_world.imports.types import (
    Action_Alert,
    Action_Command,
    Action_Publish,
    Alert,
    AlertLevel,
    Command,
    PluginError_BadCompletion,
    PluginError_BadConfig,
    Publish,
    Qos,
    Value_Boolean,
    Value_Number,
    Value_Text,
)

_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_lower(s):
    """Rust's `to_ascii_lowercase`: other letters are left as they are."""
    return s.translate(_ASCII_LOWER)


def bad(message):
    return Err(PluginError_BadCompletion(message))


class Invalid(Exception):
    """What is wrong with one action (numbered by the caller)."""


def extract_json(text):
    """The first JSON value in `text`, skipping anything before it and
    ignoring anything after."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise bad("no JSON object or array in the completion")
    r = Reader(text[min(starts) :].encode("utf-8"))
    try:
        return r.parse_value()
    except JsonError as e:
        raise bad("invalid JSON in the completion: %s at byte %d" % (e, r.i)) from None


def text_of(obj, key):
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        return v
    raise Invalid("`%s` is not text" % key)


def required(obj, key):
    v = text_of(obj, key)
    if v is None or not v.strip(RUST_WHITESPACE):
        raise Invalid("`%s` is missing" % key)
    return v


ALERT_LEVELS = {
    "info": AlertLevel.INFO,
    "warning": AlertLevel.WARNING,
    "warn": AlertLevel.WARNING,
    "critical": AlertLevel.CRITICAL,
    "error": AlertLevel.CRITICAL,
}
QOS = {0: Qos.AT_MOST_ONCE, 1: Qos.AT_LEAST_ONCE, 2: Qos.EXACTLY_ONCE}


def parse_action(obj, default_device):
    kind = text_of(obj, "type")
    if kind is None:
        kind = required(obj, "action")
    device = text_of(obj, "device")
    if device is None:
        device = default_device
    kind = ascii_lower(kind)
    if kind == "alert":
        level_text = text_of(obj, "level")
        level_name = ascii_lower("warning" if level_text is None else level_text)
        level = ALERT_LEVELS.get(level_name)
        if level is None:
            raise Invalid("unknown alert level `%s`" % level_name)
        return Action_Alert(Alert(level=level, device=device, text=required(obj, "text")))
    if kind == "publish":
        payload = obj.get("payload")
        if payload is None:
            payload = b""
        elif isinstance(payload, str):
            payload = payload.encode("utf-8")
        else:
            payload = write_value(payload).encode("utf-8")
        if "qos" not in obj:
            qos = Qos.AT_LEAST_ONCE
        else:
            # `Value::as_u64`: only a non-negative integer literal.
            q = obj["qos"]
            qos = QOS.get(q.value) if isinstance(q, Num) and q.kind == "u" else None
            if qos is None:
                raise Invalid("`qos` must be 0, 1 or 2")
        retain = obj.get("retain", False)
        if not isinstance(retain, bool):
            raise Invalid("`retain` is not a boolean")
        return Action_Publish(
            Publish(topic=required(obj, "topic"), payload=payload, qos=qos, retain=retain)
        )
    if kind == "command":
        name = text_of(obj, "command")
        if name is None:
            name = required(obj, "name")
        v = obj.get("value")
        if v is None:
            value = None
        elif isinstance(v, Num):
            value = Value_Number(v.as_f64())
        elif isinstance(v, bool):
            value = Value_Boolean(v)
        elif isinstance(v, str):
            value = Value_Text(v)
        else:
            raise Invalid("`value` must be a number, boolean or text")
        if not device:
            raise Invalid("`device` is missing")
        return Action_Command(Command(device=device, name=name, value=value))
    raise Invalid("unknown action type `%s`" % kind)


def parse_actions(text, device, max_actions):
    json = extract_json(text)
    if isinstance(json, list):
        items = json
    elif isinstance(json, dict):
        if "actions" in json:
            items = json.pop("actions")
            if not isinstance(items, list):
                raise bad("`actions` is not a list")
        else:
            items = [json]
    else:
        raise bad("the completion's JSON is neither an object nor a list")
    if len(items) > max_actions:
        raise bad("%d actions, more than the %d allowed" % (len(items), max_actions))
    actions = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad("action %d is not an object" % i)
        try:
            actions.append(parse_action(item, device))
        except Invalid as e:
            raise bad("action %d: %s" % (i, e)) from None
    return actions


def parse_config(text):
    fields = read_settings(
        text,
        lambda r: {"max_actions": r.de_usize},
        optional=set(),
        defaulted={"max_actions": 16},
    )
    return fields["max_actions"]


cached_max_actions = cached_settings(parse_config)


class Postprocess(exports.Postprocess):
    def postprocess(self, context, window, completion):
        max_actions = cached_max_actions()
        if completion is None:
            raise Err(PluginError_BadConfig("json-actions needs a completion: give the rule a prompt"))
        return parse_actions(completion.text, context.device, max_actions)
