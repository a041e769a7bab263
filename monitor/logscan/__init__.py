"""Log scanning: read agent transcripts in any of the supported formats (``readers``),
score every message and flag risky states (``scan``), and draw the HTML report
(``report``). ``emoprobe scan`` is a thin layer over ``scan.scan``."""
