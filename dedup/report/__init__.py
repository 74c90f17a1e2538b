"""The report: tables, summary.json, report.html, the calibration report."""
