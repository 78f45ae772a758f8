using System.CommandLine;
using AnyPrecML.Evaluation;

namespace AnyPrecML.Cli;

/// <summary>`anyprec perplexity`: mean NLL and perplexity of a text file.</summary>
internal static class PerplexityCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var tokenizer = CommonOptions.Tokenizer();
        var json = CommonOptions.Json();
        var bits = CommonOptions.Bits();
        var engine = CommonOptions.Engine();
        var accuracy = CommonOptions.Accuracy();
        var text = new Option<string>("--text") { Description = "Text file to evaluate.", Required = true };
        var context = new Option<int>("--context", "-c") { Description = "Tokens per window (0: the model's context).", DefaultValueFactory = _ => 0 };
        var bosPerLine = new Option<bool>("--bos-per-line") { Description = "Treat each non-empty line as a document starting with BOS (one-story-per-line data such as TinyStories)." };
        var command = new Command("perplexity", "Perplexity of a text in non-overlapping windows of the context length.") { model, tokenizer, bits, engine, accuracy, text, context, bosPerLine, json };
        command.SetAction((r, ct) =>
        {
            using var m = CommonOptions.Load(r.GetValue(model)!, r.GetValue(tokenizer), r.GetValue(bits), r.GetValue(engine), r.GetValue(accuracy), r.Err());
            string path = r.GetValue(text)!;
            if (!File.Exists(path)) throw new FileNotFoundException($"Text file '{path}' does not exist.", path);
            var progress = new ConsoleProgress<EvaluationProgress>(r.Err(), "perplexity", p => (p.Done, p.Total));
            var result = PerplexityEvaluator.Evaluate(m.Engine, m.Tokenizer, File.ReadAllText(path), r.GetValue(context), r.GetValue(bosPerLine), progress, ct);
            if (r.GetValue(json))
                r.WriteJson(new { tokens = result.Tokens, nll = Math.Round(result.Nll, 6), perplexity = Math.Round(result.Perplexity, 4), windows = result.Windows, context = result.ContextLength });
            else
                r.Out().WriteLine($"{result.Tokens} tokens in {result.Windows} windows of {result.ContextLength}: nll {result.Nll:F4} nats/token, perplexity {result.Perplexity:F3} ({result.Seconds:F1} s)");
            return Task.FromResult(0);
        });
        return command;
    }
}
