-- Agreement between every two models that answered the same reports (from the LLM cache):
-- positive (non-negated) category sets per report, Jaccard and exact-match rate.
WITH answers AS (
    SELECT provider || ':' || model AS extractor, report_sha256,
           list_sort(list_distinct(coalesce(list_transform(list_filter(
               CAST(json_extract(answer_json, '$.findings[*]') AS JSON[]),
               lambda f: NOT CAST(json_extract(f, '$.negated') AS BOOLEAN)),
               lambda f: lower(json_extract_string(f, '$.category'))), []))) AS cats
    FROM llm_calls
    WHERE status = 'ok'
),
pairs AS (
    SELECT a.extractor AS model_a, b.extractor AS model_b, a.cats AS ca, b.cats AS cb
    FROM answers a JOIN answers b ON a.report_sha256 = b.report_sha256 AND a.extractor < b.extractor
)
SELECT model_a, model_b, count(*) AS shared_reports,
       round(avg(CASE WHEN len(list_distinct(list_concat(ca, cb))) = 0 THEN 1.0
                      ELSE len(list_intersect(ca, cb)) / len(list_distinct(list_concat(ca, cb))) END), 4)
           AS mean_jaccard,
       round(avg(CASE WHEN ca = cb THEN 1.0 ELSE 0.0 END), 4) AS exact_match
FROM pairs
GROUP BY 1, 2
ORDER BY shared_reports DESC
