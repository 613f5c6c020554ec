-- Categories the vocabulary could not map (normalize drop_reason = out_of_vocabulary), most frequent first.
SELECT lower(trim(category)) AS term, count(*) AS findings, count(DISTINCT study_id) AS studies,
       any_value(evidence) AS example_evidence
FROM triplets
WHERE drop_reason = 'out_of_vocabulary'
GROUP BY 1
ORDER BY findings DESC, term
