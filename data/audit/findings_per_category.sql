-- Findings per extracted category: positive, negated and uncertain mentions and studies.
SELECT category,
       count(*) FILTER (WHERE NOT negated) AS positive,
       count(*) FILTER (WHERE negated) AS negated,
       count(*) FILTER (WHERE uncertain AND NOT negated) AS uncertain,
       count(DISTINCT study_id) AS studies
FROM triplets_raw
GROUP BY category
ORDER BY positive DESC, category
