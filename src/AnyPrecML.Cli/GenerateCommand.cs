using System.CommandLine;
using AnyPrecML.Generation;

namespace AnyPrecML.Cli;

/// <summary>`anyprec generate`: complete a prompt, streaming tokens as they come.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var tokenizer = CommonOptions.Tokenizer();
        var json = CommonOptions.Json();
        var bits = CommonOptions.Bits();
        var engine = CommonOptions.Engine();
        var accuracy = CommonOptions.Accuracy();
        var device = CommonOptions.Device();
        var prompt = new Option<string>("--prompt", "-p") { Description = "Text to complete (empty: start from BOS).", DefaultValueFactory = _ => "" };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Most tokens to generate.", DefaultValueFactory = _ => 256 };
        var temperature = new Option<float>("--temperature", "-t") { Description = "0 for greedy decoding.", DefaultValueFactory = _ => 0f };
        var topK = new Option<int>("--top-k") { Description = "Sample among the k most likely tokens (0: off).", DefaultValueFactory = _ => 0 };
        var topP = new Option<float>("--top-p") { Description = "Nucleus sampling threshold (1: off).", DefaultValueFactory = _ => 1f };
        var seed = new Option<ulong?>("--seed") { Description = "Sampler seed (the same seed gives the same text)." };
        var command = new Command("generate", "Generate text from a prompt.")
        {
            model, tokenizer, bits, engine, accuracy, device, prompt, maxTokens, temperature, topK, topP, seed, json,
        };
        command.SetAction((r, ct) =>
        {
            using var m = CommonOptions.Load(r.GetValue(model)!, r.GetValue(tokenizer), r.GetValue(bits), r.GetValue(engine), r.GetValue(accuracy), r.GetValue(device)!, r.Err());
            var options = new GenerationOptions
            {
                MaxTokens = r.GetValue(maxTokens), Temperature = r.GetValue(temperature),
                TopK = r.GetValue(topK), TopP = r.GetValue(topP), Seed = r.GetValue(seed),
            }.Validated();
            var generator = new TextGenerator(m.Engine, m.Tokenizer);
            if (r.GetValue(json))
            {
                var result = generator.Generate(r.GetValue(prompt)!, options, ct);
                r.WriteJson(new { text = result.Text, tokens = result.Tokens, tokens_per_second = Math.Round(result.TokensPerSecond, 2), stop_reason = result.StopReason });
                return Task.FromResult(0);
            }
            var o = r.Out();
            var sw = System.Diagnostics.Stopwatch.StartNew();
            int tokens = 0;
            o.Write(r.GetValue(prompt));
            foreach (var step in generator.GenerateTokens(r.GetValue(prompt)!, options, ct))
            {
                o.Write(step.Text);
                o.Flush();
                if (step.StopReason != "eos") tokens++;
            }
            o.WriteLine();
            r.Err().WriteLine($"{tokens} tokens, {tokens / sw.Elapsed.TotalSeconds:F1} tokens/s");
            return Task.FromResult(0);
        });
        return command;
    }
}
