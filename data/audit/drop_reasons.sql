-- Kept and dropped findings after normalize, by reason.
SELECT coalesce(drop_reason, 'kept') AS outcome, count(*) AS findings, count(DISTINCT study_id) AS studies
FROM triplets
GROUP BY 1
ORDER BY findings DESC
