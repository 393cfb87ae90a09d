// Postprocessor: turns a model completion into validated actions. The
// JavaScript twin of the Rust plugin plugins/json-actions: same settings,
// same actions, same error kinds.
//
// The completion must hold one JSON value: {"actions": [...]}, a list of
// actions, or one action. Prose or a Markdown code fence around the JSON is
// ignored. Actions:
// - {"type":"alert","level":"warning","text":"...","device":"m1"}
// - {"type":"publish","topic":"...","payload":{...},"qos":1,"retain":false}
//   (a text payload is sent as it is, any other JSON value as JSON text)
// - {"type":"command","device":"lamp-1","command":"set","value":21.5}
//
// A missing `device` is the window's device. Anything else is a
// bad-completion error that says what is wrong; nothing is guessed.
//
//   [postprocess]
//   plugin = "js-json-actions"
//   config = { max_actions = 8 }

import { usize } from '../lib/config.js';
import { cachedSettings, PluginError } from '../lib/plugin.js';
import { asciiLowercase, compareStr, trim } from '../lib/rust.js';
import { JsonError, Reader, stringify, utf8 } from '../lib/serde-json.js';

function bad(message) {
  return new PluginError('bad-completion', message);
}

const config = cachedSettings({ max_actions: usize }, (c) => ({ maxActions: c.max_actions ?? 16 }));

/** The first JSON value in `text`, skipping anything before it and ignoring anything after. */
function extractJson(text) {
  const starts = [text.indexOf('{'), text.indexOf('[')].filter((i) => i >= 0);
  if (starts.length === 0) throw bad('no JSON object or array in the completion');
  try {
    return new Reader(utf8(text.slice(Math.min(...starts)))).parseValue();
  } catch (e) {
    if (e instanceof JsonError) throw bad(`invalid JSON in the completion: ${e.message}`);
    throw e;
  }
}

/** What is wrong with one action; parseActions adds which action it is. */
class Invalid extends Error {}

function text(obj, key) {
  const v = obj.get(key);
  if (v === undefined || v.t === 'null') return undefined;
  if (v.t === 'text') return v.v;
  throw new Invalid(`\`${key}\` is not text`);
}

function required(obj, key) {
  const s = text(obj, key);
  if (s === undefined || trim(s) === '') throw new Invalid(`\`${key}\` is missing`);
  return s;
}

const QOS = ['at-most-once', 'at-least-once', 'exactly-once'];

function parseAction(obj, defaultDevice) {
  const kind = text(obj, 'type') ?? required(obj, 'action');
  const device = text(obj, 'device') ?? defaultDevice;
  const lowered = asciiLowercase(kind);
  switch (lowered) {
    case 'alert': {
      let level;
      const l = asciiLowercase(text(obj, 'level') ?? 'warning');
      switch (l) {
        case 'info':
          level = 'info';
          break;
        case 'warning':
        case 'warn':
          level = 'warning';
          break;
        case 'critical':
        case 'error':
          level = 'critical';
          break;
        default:
          throw new Invalid(`unknown alert level \`${l}\``);
      }
      return { tag: 'alert', val: { level, device, text: required(obj, 'text') } };
    }
    case 'publish': {
      const p = obj.get('payload');
      let payload;
      if (p === undefined || p.t === 'null') payload = new Uint8Array(0);
      else if (p.t === 'text') payload = utf8(p.v);
      else payload = utf8(stringify(p, compareStr));
      // Value::as_u64: only a non-negative integer written without fraction or exponent.
      const q = obj.get('qos');
      let qos;
      if (q === undefined) qos = 'at-least-once';
      else if (q.t === 'number' && q.kind === 'u64' && q.f <= 2) qos = QOS[q.f];
      else throw new Invalid('`qos` must be 0, 1 or 2');
      const r = obj.get('retain');
      let retain;
      if (r === undefined) retain = false;
      else if (r.t === 'bool') retain = r.v;
      else throw new Invalid('`retain` is not a boolean');
      return { tag: 'publish', val: { topic: required(obj, 'topic'), payload, qos, retain } };
    }
    case 'command': {
      const name = text(obj, 'command') ?? required(obj, 'name');
      const v = obj.get('value');
      let value;
      if (v === undefined || v.t === 'null') value = undefined;
      else if (v.t === 'number') value = { tag: 'number', val: v.f };
      else if (v.t === 'bool') value = { tag: 'boolean', val: v.v };
      else if (v.t === 'text') value = { tag: 'text', val: v.v };
      else throw new Invalid('`value` must be a number, boolean or text');
      if (device === '') throw new Invalid('`device` is missing');
      return { tag: 'command', val: { device, name, value } };
    }
    default:
      throw new Invalid(`unknown action type \`${lowered}\``);
  }
}

function parseActions(completionText, device, cfg) {
  const json = extractJson(completionText);
  let items;
  if (json.t === 'array') {
    items = json.v;
  } else if (json.t === 'object') {
    const actions = json.v.get('actions');
    if (actions === undefined) items = [json];
    else if (actions.t === 'array') items = actions.v;
    else throw bad('`actions` is not a list');
  } else {
    throw bad("the completion's JSON is neither an object nor a list");
  }
  if (items.length > cfg.maxActions) {
    throw bad(`${items.length} actions, more than the ${cfg.maxActions} allowed`);
  }
  return items.map((item, i) => {
    if (item.t !== 'object') throw bad(`action ${i} is not an object`);
    try {
      return parseAction(item.v, device);
    } catch (e) {
      if (e instanceof Invalid) throw bad(`action ${i}: ${e.message}`);
      throw e;
    }
  });
}

export const postprocess = {
  postprocess(context, _window, completion) {
    const cfg = config();
    if (completion == null) {
      throw new PluginError('bad-config', 'json-actions needs a completion: give the rule a prompt');
    }
    return parseActions(completion.text, context.device, cfg);
  },
};
