"""iotpipe_operator: the kopf operator that turns an IoTPipeline into running workloads.

Module map (decisions are pure; I/O is thin):

- ``crd``: the IoTPipeline CRD (schema, defaults, CEL rules); ``crds/iotpipelines.yaml`` is
  its rendering (``iotpipe-operator crd``). ``apply_defaults`` fills schema defaults.
- ``builders`` + ``templates/``: spec -> child manifests (Jinja2 templates, parsed YAML).
- ``drain``: the scale-down design (retained queue PVCs, drain Jobs, the scale-up race,
  deletion) and its pure planner.
- ``status``: conditions Ready/Progressing/Degraded, phase, per-tier counts.
- ``kube``: generic create / merge-patch / delete on dict objects (official client).
- ``handlers``: kopf handlers (create, update, resume, timer) that fetch, build, apply
  with owner references, drive drains and report status and events.
- ``rbac``: every API access the operator makes, for the Helm chart's ClusterRole.
- ``cli``: ``iotpipe-operator run | render -f FILE | crd``.
"""

__version__ = "0.1.0"
