-- Failed extractions grouped by error, with an example study for each.
SELECT regexp_replace(error, '[0-9.]+', '#', 'g') AS error_kind,
       count(*) AS reports,
       min(study_id) AS example_study
FROM extractions
WHERE status = 'failed'
GROUP BY 1
ORDER BY reports DESC
