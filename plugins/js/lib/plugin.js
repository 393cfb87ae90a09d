// What the JavaScript plugins share about being a plugin: the error they
// return, and their settings.

import { getJson } from 'ganglion:plugin/config@0.1.0';
import { parseStruct } from './config.js';
import { JsonError } from './serde-json.js';

/** Thrown to return the `err` case: the bindings send `payload` as the plugin-error. */
export class PluginError extends Error {
  constructor(tag, message) {
    super(message);
    this.payload = { tag, val: message };
  }
}

/**
 * A function that gives the plugin's settings: the struct of `fields` (see
 * `parseStruct`) passed through `finish`, or throws their bad-config error.
 * An instance serves one rule, so the settings (or their error) are read once.
 */
export function cachedSettings(fields, finish) {
  let cached;
  function read() {
    try {
      return finish(parseStruct(getJson(), fields));
    } catch (e) {
      if (e instanceof JsonError) return new PluginError('bad-config', e.message);
      throw e;
    }
  }
  return () => {
    cached ??= read();
    if (cached instanceof PluginError) throw cached;
    return cached;
  };
}
