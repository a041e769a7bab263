"""Log scanning: read agent transcripts in any of the supported formats (``readers``),
score every message and flag risky states (``scan``), and draw the HTML report
(``report``). ``emoprobe scan`` is a thin layer over ``scan.scan``; ``scan_on_ray``
(``ray_scan``, the optional ``emoprobe[ray]`` extra) runs the same scan on a Ray cluster."""


def __getattr__(name):  # lazy: reading logs should not import the scanner
    if name == "scan_on_ray":
        from .ray_scan import scan_on_ray

        return scan_on_ray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
