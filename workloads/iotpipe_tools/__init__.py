"""Tools around the iotpipe product: benchmarks (``iotpipe bench``), the device fleet
simulator (``iotpipe simulate``) and the bounded waits and free ports that tools and tests
share.

Installed beside the product by ``make venv`` but never imported by it: the ``iotpipe``
command reaches these through its lazy command table, and the workload image leaves this
package out.
"""
