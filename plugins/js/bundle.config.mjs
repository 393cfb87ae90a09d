// Rolldown settings for `jco componentize --bundle`: the host's interfaces are
// imports of the component, not modules to look for on disk.
export default { external: [/^ganglion:plugin\//] };
