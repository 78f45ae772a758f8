using Microsoft.ML;

namespace AnyPrecML.MLNet.Scoring;

/// <summary>One input record after scoring: the JSON line written to the output, or the one written to the errors file.</summary>
/// <remarks><see cref="RouteWarning"/>: the router's warning when a row's budget could not be met and the fastest route ran.</remarks>
internal readonly record struct ScoredRecord(long Index, long Line, string? OutputLine, string? ErrorLine, string? Problem, bool Truncated, string? RouteWarning = null);

/// <summary>
/// The row scoring of a batch job, shared by `anyprec score` and the Orleans scoring worker so both write the same
/// bytes: records stream through the ML.NET transformer at its current width, each becoming one JSON line
/// {row, token_count, log_likelihood, perplexity, completion}, or an errors line {row, line, error} for an invalid record.
/// </summary>
internal static class RowScorer
{
    /// <summary>The transformer `score` runs: the model opened once (planes mapped), read column "Text" (and "Budget" when <paramref name="budgets"/>).</summary>
    public static AnyPrecisionTransformer Open(MLContext ml, string modelPath, int? bits, int completionTokens, AnyPrecisionEngineKind engine,
        string? profilePath = null, bool budgets = false, bool fastestWhenOverBudget = false)
    {
        var options = new AnyPrecisionQuantizeOptions
        {
            ModelPath = modelPath, InputColumnName = "Text", Bits = bits, CompletionTokens = completionTokens, Engine = engine,
            ProfilePath = profilePath, BudgetColumnName = budgets ? "Budget" : null, FastestWhenOverBudget = fastestWhenOverBudget,
        };
        return ml.Transforms.AnyPrecisionQuantize(options).Fit(ml.Data.LoadFromEnumerable(Array.Empty<Row>()));
    }

    /// <summary>
    /// Scores <paramref name="records"/> in order at the transformer's width (or each row's routed width); lazy, nothing
    /// holds them all. Each line carries the width the row ran at, and a row with a budget the router's decision.
    /// </summary>
    public static IEnumerable<ScoredRecord> Score(MLContext ml, AnyPrecisionTransformer transformer, IEnumerable<InputRecord> records)
    {
        var rows = records.Select(x => new Row { Text = x.Text ?? "", Index = x.Index, Line = x.Line, Problem = x.Problem ?? "", Truncated = x.Truncated, Budget = (float)(x.Budget ?? double.NaN) });
        var view = transformer.Transform(ml.Data.LoadFromEnumerable(rows));
        using var cursor = view.GetRowCursor(view.Schema);
        var ll = cursor.GetGetter<float>(view.Schema["LogLikelihood"]);
        var n = cursor.GetGetter<int>(view.Schema["TokenCount"]);
        var ppl = cursor.GetGetter<float>(view.Schema["Perplexity"]);
        var comp = cursor.GetGetter<ReadOnlyMemory<char>>(view.Schema["Completion"]);
        var index = cursor.GetGetter<long>(view.Schema["Index"]);
        var line = cursor.GetGetter<long>(view.Schema["Line"]);
        var problem = cursor.GetGetter<ReadOnlyMemory<char>>(view.Schema["Problem"]);
        var truncated = cursor.GetGetter<bool>(view.Schema["Truncated"]);
        var width = cursor.GetGetter<float>(view.Schema["Bits"]);
        var draft = cursor.GetGetter<int>(view.Schema["DraftBits"]);
        var route = cursor.GetGetter<ReadOnlyMemory<char>>(view.Schema["Route"]);
        var budget = cursor.GetGetter<float>(view.Schema["Budget"]);
        float llv = 0, pplv = 0, wv = 0, bv = 0; int nv = 0, dv = 0; long iv = 0, lv = 0; bool tv = false;
        ReadOnlyMemory<char> cv = default, pv = default, rv = default;
        while (cursor.MoveNext())
        {
            index(ref iv); line(ref lv); problem(ref pv);
            if (!pv.IsEmpty)
            {
                // The model is not run for an invalid row: its output getters are never called.
                yield return new(iv, lv, null, JsonLines.Format(new { row = iv, line = lv, error = pv.ToString() }), pv.ToString(), false);
                continue;
            }
            truncated(ref tv);
            ll(ref llv); n(ref nv); ppl(ref pplv); comp(ref cv); width(ref wv); draft(ref dv); route(ref rv); budget(ref bv);
            // The width each row ran at is in its line; a budgeted row also says what the router chose and why.
            object? routed = float.IsNaN(bv) ? null : new { budget_ms = bv, bits = (int)wv, draft_bits = dv == 0 ? (int?)null : dv, reason = rv.ToString() };
            string output = JsonLines.Format(new
            {
                row = iv, token_count = nv, log_likelihood = Round(llv), perplexity = Round(pplv), completion = cv.ToString(), bits = Math.Round(wv, 4), route = routed,
            });
            yield return new(iv, lv, output, null, null, tv, rv.Span.StartsWith("warning: ") ? rv.ToString() : null);
        }
    }

    private static double Round(float v) => float.IsFinite(v) ? Math.Round(v, 5) : v;

    private sealed class Row
    {
        public string Text { get; set; } = "";
        public long Index { get; set; }
        public long Line { get; set; }
        public string Problem { get; set; } = "";
        public bool Truncated { get; set; }
        public float Budget { get; set; } = float.NaN;
    }
}
