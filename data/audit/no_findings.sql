-- Reports for which the extractor returned no finding at all (normal, empty or missed?).
SELECT e.study_id, e.source, s.split, left(replace(s.report, chr(10), ' '), 160) AS report_start
FROM extractions e JOIN studies s USING (study_id)
WHERE e.status = 'ok' AND e.n_findings = 0
ORDER BY e.study_id
